//! `_PathOps`: the Python side of the path runner (DESIGN.md §14).
//!
//! `_PathOps(workers)` starts the runner; `submit(future, code, name1,
//! path1, name2, path2, fd1, fd2, a, b, c, data)` queues one job (the tuple
//! `caio/_pathops.py` builds); `drain()` — the loop's reader — turns every
//! finished job into its result or `OSError` and resolves its future, and
//! returns how many jobs are still in flight; `fileno()`, `in_flight()`,
//! `engine_jobs()` (jobs the backend's engine completed), `close()` (refuse
//! new jobs, let the workers end).

use std::ffi::{c_int, CString};
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};

use pyo3_ffi::*;

use super::job::{Code, Job, Outcome, PyRefs};
use super::runner::Runner;
use crate::py::typespec::{fast, noargs};
use crate::py::{
    call_method, none, py_int, py_tuple, py_usize, set_result_unless_done, trampoline,
    trampoline_void, Borrowed, Interned, LazyObject, Owned, PyErr, PyResult, SavedErr, TypeSpec,
};

#[repr(C)]
struct PathOps {
    ob_base: PyObject,
    runner: AtomicPtr<Runner>,
}

/// # Safety
/// `p` is a live `_PathOps`.
unsafe fn runner<'a>(p: *mut PyObject) -> PyResult<&'a Runner> {
    // SAFETY: instances start with the `PathOps` struct (caller's contract).
    let r = unsafe { (*p.cast::<PathOps>()).runner.load(Ordering::Acquire) };
    if r.is_null() {
        return Err(PyErr::runtime("the path runner is closed"));
    }
    // SAFETY: set by tp_new, freed only by dealloc (nothing else can run then).
    Ok(unsafe { &*r })
}

unsafe extern "C" fn ops_new(
    tp: *mut PyTypeObject,
    args: *mut PyObject,
    _kwargs: *mut PyObject,
) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: CPython calls tp_new attached, `args` a tuple.
        let (workers, slice_ns) = unsafe {
            if PyTuple_Size(args) != 2 {
                return Err(PyErr::type_error(
                    "_PathOps(workers, inline_slice_ns) takes two arguments",
                ));
            }
            let w = Borrowed::from_ptr(PyTuple_GetItem(args, 0));
            let i = Borrowed::from_ptr(PyTuple_GetItem(args, 1));
            (
                crate::args::int_in(w, "workers", 1, 1024)?,
                crate::args::int_as(i, "inline_slice_ns", 0u64, u64::MAX)?,
            )
        };
        let runner = Runner::new(usize::try_from(workers).unwrap_or(1), slice_ns)
            .map_err(|e| PyErr::os(e.raw_os_error().unwrap_or(libc::EAGAIN)))?;
        // SAFETY: `tp` is our type: `tp_alloc` returns a zeroed instance big
        // enough for `PathOps`, referenced by nothing else yet.
        unsafe {
            let alloc = (*tp).tp_alloc.unwrap_or(PyType_GenericAlloc);
            let obj = match Owned::from_new(alloc(tp, 0)) {
                Ok(o) => o,
                Err(e) => {
                    runner.stop(false);
                    return Err(e);
                }
            };
            let me = obj.as_ptr().cast::<PathOps>();
            ptr::addr_of_mut!((*me).runner).write(AtomicPtr::new(Box::into_raw(Box::new(runner))));
            Ok(obj)
        }
    })
}

/// Releases a job's Python references; an fd it opened for nobody is closed.
///
/// # Safety
/// Attached; the job's references are still owned by it.
unsafe fn release(job: Job) {
    if let (Code::Open, Outcome::Int(fd)) = (job.code, &job.outcome) {
        // SAFETY: the fd this job opened, which nobody will ever see.
        unsafe { libc::close(c_int::try_from(*fd).unwrap_or(-1)) };
    }
    // SAFETY: attached; each is NULL or a reference the job owns.
    unsafe {
        for p in [job.py.future, job.py.name1, job.py.name2, job.py.data] {
            Py_XDECREF(p);
        }
    }
}

unsafe extern "C" fn ops_dealloc(slf: *mut PyObject) {
    trampoline_void(|| {
        // SAFETY: CPython deallocates one of our objects: nothing else
        // references it. The runner is stopped and its workers joined (GIL
        // released; they only finish the system calls they are in — e.g.
        // the event loop was closed with jobs in flight, so no drain will
        // come), then every job left is released: an fd opened for nobody
        // is closed.
        unsafe {
            let r = (*slf.cast::<PathOps>())
                .runner
                .swap(ptr::null_mut(), Ordering::AcqRel);
            if !r.is_null() {
                let r = Box::from_raw(r);
                crate::py::allow_threads(|| r.stop(true));
                for job in r.take_queued().into_iter().chain(r.take_done()) {
                    release(*job);
                }
            }
            let tp = Py_TYPE(slf);
            if let Some(free) = (*tp).tp_free {
                free(slf.cast());
            }
            Py_DECREF(tp.cast());
        }
    });
}

fn opt_path(o: Borrowed<'_>) -> PyResult<Option<CString>> {
    if o.is_none() {
        return Ok(None);
    }
    // SAFETY: attached; `o` a live object.
    unsafe {
        if PyBytes_Check(o.as_ptr()) == 0 {
            return Err(PyErr::type_error("path must be bytes"));
        }
        let p = PyBytes_AsString(o.as_ptr());
        let n = crate::py::usize_of(PyBytes_Size(o.as_ptr()));
        let v = std::slice::from_raw_parts(p.cast::<u8>(), n).to_vec();
        CString::new(v)
            .map(Some)
            .map_err(|_| PyErr::value_error("embedded null byte"))
    }
}

fn opt_fd(o: Borrowed<'_>) -> PyResult<c_int> {
    if o.is_none() {
        return Ok(libc::AT_FDCWD);
    }
    crate::args::int_as(o, "fd", c_int::MIN, c_int::MAX)
}

fn i64_arg(o: Borrowed<'_>, name: &str) -> PyResult<i64> {
    crate::args::int_as(o, name, i64::MIN, i64::MAX)
}

fn new_ref(o: Borrowed<'_>) -> *mut PyObject {
    if o.is_none() {
        ptr::null_mut()
    } else {
        o.to_owned().into_ptr()
    }
}

unsafe extern "C" fn ops_submit(
    slf: *mut PyObject,
    args: *mut *mut PyObject,
    nargs: Py_ssize_t,
) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: CPython's METH_FASTCALL arguments, alive for the call.
        let a = unsafe { crate::args::positional(args.cast_const(), nargs) };
        if a.len() != 12 {
            return Err(PyErr::type_error("submit() takes 12 arguments"));
        }
        // SAFETY: live argument objects.
        let arg = |i: usize| unsafe { Borrowed::from_ptr(a[i]) };
        // SAFETY: a method of our type, called attached.
        let r = unsafe { runner(slf)? };
        let code = Code::from_i64(i64_arg(arg(1), "code")?)
            .ok_or_else(|| PyErr::value_error("unknown path job"))?;
        let data = arg(11);
        let (data_ptr, data_len) = if data.is_none() {
            (ptr::null(), 0)
        } else {
            // SAFETY: attached; checked to be `bytes`, whose buffer stays
            // valid and unchanged while the job holds its reference.
            unsafe {
                if PyBytes_Check(data.as_ptr()) == 0 {
                    return Err(PyErr::type_error("data must be bytes"));
                }
                (
                    PyBytes_AsString(data.as_ptr()).cast::<u8>().cast_const(),
                    crate::py::usize_of(PyBytes_Size(data.as_ptr())),
                )
            }
        };
        let job = Box::new(Job {
            code,
            path1: opt_path(arg(3))?,
            path2: opt_path(arg(5))?,
            fd1: opt_fd(arg(6))?,
            fd2: opt_fd(arg(7))?,
            a: i64_arg(arg(8), "a")?,
            b: i64_arg(arg(9), "b")?,
            c: i64_arg(arg(10), "c")?,
            data: data_ptr,
            data_len,
            py: PyRefs {
                future: arg(0).to_owned().into_ptr(),
                name1: new_ref(arg(2)),
                name2: new_ref(arg(4)),
                data: new_ref(data),
            },
            outcome: Outcome::Pending,
        });
        let mut job = job;
        let inline = match code {
            Code::ReadFile => r.inline_allowed() && super::inline::try_read_file(&mut job),
            Code::Stat => r.inline_allowed() && super::inline::try_stat(&mut job),
            _ => false,
        };
        if inline {
            // Completed from the caches on this thread: the future is
            // resolved before the caller sees it (awaiting it never
            // suspends).
            // SAFETY: attached; the job's own references.
            unsafe { resolve(*job) };
            return Ok(none());
        }
        match r.submit(job) {
            Ok(()) => Ok(none()),
            Err(job) => {
                // SAFETY: attached; the job's references are its own.
                unsafe { release(*job) };
                Err(PyErr::runtime(
                    "AsyncioContext is closed: create a new one to submit operations",
                ))
            }
        }
    })
}

static STAT_RESULT: LazyObject = LazyObject::new(|| {
    // SAFETY: attached (crate invariant); static NUL-terminated names.
    unsafe {
        let os = Owned::from_new(PyImport_ImportModule(c"os".as_ptr()))?;
        Owned::from_new(PyObject_GetAttrString(os.as_ptr(), c"stat_result".as_ptr()))
    }
});

fn py_u64(v: u64) -> PyResult<Owned> {
    // SAFETY: attached (crate invariant).
    unsafe { Owned::from_new(PyLong_FromUnsignedLongLong(v)) }
}

fn py_i128(v: i128) -> PyResult<Owned> {
    match i64::try_from(v) {
        Ok(v) => py_int(v),
        Err(_) => {
            let s = CString::new(v.to_string()).unwrap_or_default();
            // SAFETY: attached; a NUL-terminated decimal literal.
            unsafe { Owned::from_new(PyLong_FromString(s.as_ptr(), ptr::null_mut(), 10)) }
        }
    }
}

/// `uid_t`/`gid_t` as CPython shows them: `(uid_t)-1` is -1.
fn py_id(v: u32) -> PyResult<Owned> {
    if v == u32::MAX {
        py_int(-1)
    } else {
        py_int(i64::from(v))
    }
}

/// One time stamp: whole seconds, float seconds and nanoseconds, computed
/// as CPython's `fill_time` does.
#[allow(clippy::cast_precision_loss)] // exactly CPython's double arithmetic
fn times(sec: i64, nsec: i64) -> PyResult<(Owned, Owned, Owned)> {
    // SAFETY: attached (crate invariant).
    let f = unsafe { Owned::from_new(PyFloat_FromDouble(sec as f64 + nsec as f64 * 1e-9))? };
    Ok((
        py_int(sec)?,
        f,
        py_i128(i128::from(sec) * 1_000_000_000 + i128::from(nsec))?,
    ))
}

/// `os.stat_result` with CPython's field order on Linux: the ten visible
/// fields (7–9 the integer times), then the float times, the ns times,
/// `st_blksize`, `st_blocks`, `st_rdev`.
#[allow(clippy::useless_conversion, clippy::unnecessary_cast)] // field types vary by target
fn stat_result(st: &libc::stat) -> PyResult<Owned> {
    let (ai, af, an) = times(st.st_atime as i64, st.st_atime_nsec as i64)?;
    let (mi, mf, mn) = times(st.st_mtime as i64, st.st_mtime_nsec as i64)?;
    let (ci, cf, cn) = times(st.st_ctime as i64, st.st_ctime_nsec as i64)?;
    let fields = vec![
        py_int(i64::from(st.st_mode))?,
        py_u64(st.st_ino as u64)?,
        py_u64(st.st_dev as u64)?,
        py_u64(st.st_nlink as u64)?,
        py_id(st.st_uid)?,
        py_id(st.st_gid)?,
        py_int(st.st_size as i64)?,
        ai,
        mi,
        ci,
        af,
        mf,
        cf,
        an,
        mn,
        cn,
        py_int(st.st_blksize as i64)?,
        py_int(st.st_blocks as i64)?,
        py_u64(st.st_rdev as u64)?,
    ];
    let t = py_tuple(fields)?;
    crate::py::call1(STAT_RESULT.get()?, t.borrow())
}

/// The `OSError` `os` raises for `errno` and these file names.
fn os_error(errno: i32, name1: *mut PyObject, name2: *mut PyObject) -> PyResult<Owned> {
    // SAFETY: attached; errno is this thread's; the names are NULL or live.
    unsafe {
        *libc::__errno_location() = errno;
        PyErr_SetFromErrnoWithFilenameObjects(PyExc_OSError, name1, name2);
        SavedErr::fetch()
            .into_value()
            .ok_or_else(|| PyErr::os(errno))
    }
}

fn value_of(job: &mut Job) -> PyResult<Result<Owned, Owned>> {
    Ok(
        match std::mem::replace(&mut job.outcome, Outcome::Pending) {
            Outcome::Failed(e) => Err(os_error(e, job.py.name1, job.py.name2)?),
            Outcome::Unit | Outcome::Pending => Ok(none()),
            Outcome::Int(n) => {
                job.outcome = Outcome::Int(n); // kept: an unclaimed fd is closed
                Ok(py_int(n)?)
            }
            Outcome::Bytes(v) => {
                // SAFETY: attached; copies `v.len()` initialised bytes.
                Ok(unsafe {
                    Owned::from_new(PyBytes_FromStringAndSize(
                        v.as_ptr().cast(),
                        crate::py::ssize(v.len()),
                    ))?
                })
            }
            Outcome::Stat(st) => Ok(stat_result(&st)?),
        },
    )
}

static DONE: Interned = Interned::new(c"done");
static SET_EXCEPTION: Interned = Interned::new(c"set_exception");

/// Resolves one finished job's future (unless its awaiter cancelled it)
/// and releases the job.
///
/// # Safety
/// Attached; the job came out of the runner.
unsafe fn resolve(mut job: Job) {
    // SAFETY: the job's future reference is live.
    let fut = unsafe { Borrowed::from_ptr(job.py.future) };
    let claimed = match value_of(&mut job) {
        Ok(Ok(v)) => set_result_unless_done(fut, v.borrow()),
        Ok(Err(exc)) => set_exception_unless_done(fut, &exc),
        Err(e) => e
            .into_instance()
            .and_then(|exc| set_exception_unless_done(fut, &exc)),
    };
    match claimed {
        // The awaiter has the fd now: do not close it.
        Ok(true) => job.outcome = Outcome::Pending,
        Ok(false) => {}
        Err(_) => crate::py::clear_error(),
    }
    // SAFETY: attached; the job's own references.
    unsafe { release(job) };
}

fn set_exception_unless_done(fut: Borrowed<'_>, exc: &Owned) -> PyResult<bool> {
    let done = call_method(fut, DONE.get()?, &[])?;
    if done.borrow().is_true_singleton() {
        return Ok(false);
    }
    call_method(fut, SET_EXCEPTION.get()?, &[exc.as_ptr()])?;
    Ok(true)
}

unsafe extern "C" fn ops_drain(slf: *mut PyObject, _: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: a method of our type, called attached.
        let r = unsafe { runner(slf)? };
        r.refill();
        for job in r.take_done() {
            // SAFETY: attached; a finished job of this runner.
            unsafe { resolve(*job) };
        }
        py_usize(r.in_flight())
    })
}

unsafe extern "C" fn ops_fileno(slf: *mut PyObject, _: *mut PyObject) -> *mut PyObject {
    // SAFETY: a method of our type, called attached.
    trampoline(|| py_int(i64::from(unsafe { runner(slf)? }.fileno())))
}

unsafe extern "C" fn ops_in_flight(slf: *mut PyObject, _: *mut PyObject) -> *mut PyObject {
    // SAFETY: a method of our type, called attached.
    trampoline(|| py_usize(unsafe { runner(slf)? }.in_flight()))
}

unsafe extern "C" fn ops_engine_jobs(slf: *mut PyObject, _: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: a method of our type, called attached.
        let n = unsafe { runner(slf)? }.engine_completed();
        py_usize(usize::try_from(n).unwrap_or(usize::MAX))
    })
}

unsafe extern "C" fn ops_close(slf: *mut PyObject, _: *mut PyObject) -> *mut PyObject {
    trampoline(|| {
        // SAFETY: a method of our type, called attached.
        let r = unsafe { runner(slf)? };
        // The workers have nothing left (the caller waits until idle) or
        // finish what they hold; joining waits at most for those.
        crate::py::allow_threads(|| r.stop(true));
        for job in r.take_queued().into_iter().chain(r.take_done()) {
            // SAFETY: attached; jobs of this runner.
            unsafe { resolve(*job) };
        }
        Ok(none())
    })
}

pub(super) fn type_spec() -> TypeSpec {
    TypeSpec::new(
        c"caio._PathOps",
        std::mem::size_of::<PathOps>(),
        Py_TPFLAGS_DEFAULT,
    )
    .doc(c"_PathOps(workers, inline_slice_ns, /)\n--\n\nThe native runner of path operations (DESIGN.md \xc2\xa714).")
    .new_fn(ops_new)
    .dealloc(ops_dealloc)
    .method(fast(
        c"submit",
        ops_submit,
        c"submit($self, future, code, name1, path1, name2, path2, fd1, fd2, a, b, c, data, /)\n--\n\nQueue one job (the tuple of caio/_pathops.py).",
    ))
    .method(noargs(
        c"drain",
        ops_drain,
        c"drain($self, /)\n--\n\nResolve the futures of the finished jobs; return how many are still in flight.",
    ))
    .method(noargs(
        c"fileno",
        ops_fileno,
        c"fileno($self, /)\n--\n\nThe wake-up fd the loop watches.",
    ))
    .method(noargs(
        c"in_flight",
        ops_in_flight,
        c"in_flight($self, /)\n--\n\nJobs submitted and not drained yet.",
    ))
    .method(noargs(
        c"engine_jobs",
        ops_engine_jobs,
        c"engine_jobs($self, /)\n--\n\nJobs the backend's own engine (io_uring opcodes) completed so far.",
    ))
    .method(noargs(
        c"close",
        ops_close,
        c"close($self, /)\n--\n\nRefuse new jobs; the workers finish theirs and end.",
    ))
}
