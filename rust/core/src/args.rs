//! Argument parsing for `METH_FASTCALL | METH_KEYWORDS` functions and the
//! integer conversions every constructor uses.
//!
//! Integer arguments follow CPython's rules (anything with `__index__`; `bool`
//! works; `float`/`str`/`None` raise `TypeError`). Unlike upstream caio, values
//! are range-checked instead of silently wrapping (DESIGN.md §6.2 wrap): an fd of
//! `2**32 + 5` must not become fd 5, `nbytes=2**64` must not become 0.

use std::ffi::CStr;

use pyo3_ffi::*;

use crate::py::{ssize, str_of, usize_of, Borrowed, Exc, Owned, PyErr, PyResult};

/// Signature of a function taking named parameters.
pub struct Params {
    /// Function name for error messages, e.g. `"read"`.
    pub fname: &'static str,
    pub names: &'static [&'static str],
    /// How many leading parameters are required.
    pub required: usize,
    /// Whether parameters may be passed by keyword at all.
    pub keywords: bool,
}

impl Params {
    /// Parameters `names` of `fname` (for messages), the first `required` of
    /// them required, passable by keyword too.
    pub const fn new(
        fname: &'static str,
        names: &'static [&'static str],
        required: usize,
    ) -> Params {
        Params {
            fname,
            names,
            required,
            keywords: true,
        }
    }

    /// As [`Params::new`], positional only.
    pub const fn positional(
        fname: &'static str,
        names: &'static [&'static str],
        required: usize,
    ) -> Params {
        Params {
            keywords: false,
            ..Params::new(fname, names, required)
        }
    }
}

/// Parsed arguments: `N` slots, `None` for parameters not given.
pub struct Args<'a, const N: usize>(pub [Option<Borrowed<'a>>; N]);

impl<'a, const N: usize> Args<'a, N> {
    #[inline]
    pub fn get(&self, i: usize) -> Option<Borrowed<'a>> {
        self.0[i]
    }
}

/// The number of positional arguments in a vectorcall `nargsf` (the
/// `PY_VECTORCALL_ARGUMENTS_OFFSET` flag masked off).
#[inline]
pub fn nargs(nargsf: Py_ssize_t) -> usize {
    // SAFETY: `PyVectorcall_NARGS` is pure arithmetic on its argument.
    usize_of(unsafe { PyVectorcall_NARGS(crate::num::usize_bits(nargsf)) })
}

/// The positional arguments of a vectorcall as a slice. `args` may be NULL
/// when there are none (CPython passes NULL for zero-argument calls such as
/// `PyObject_CallNoArgs`), and `slice::from_raw_parts` on NULL is undefined
/// behaviour even for length 0: this guards it.
///
/// # Safety
/// `args`/`nargsf` come straight from CPython's vectorcall, and the slice is
/// not used after the call returns.
#[inline]
pub unsafe fn positional<'a>(
    args: *const *mut PyObject,
    nargsf: Py_ssize_t,
) -> &'a [*mut PyObject] {
    let n = nargs(nargsf);
    if n == 0 || args.is_null() {
        return &[];
    }
    // SAFETY: CPython passes `n` valid argument pointers at `args` (non-NULL
    // here), alive for the call (caller's contract).
    unsafe { std::slice::from_raw_parts(args, n) }
}

impl Params {
    /// Parses a vectorcall argument vector.
    ///
    /// # Safety
    /// `args`/`nargsf`/`kwnames` must come straight from CPython's vectorcall
    /// (alive for `'a`); caller attached.
    pub unsafe fn parse<'a, const N: usize>(
        &self,
        args: *const *mut PyObject,
        nargsf: Py_ssize_t,
        kwnames: *mut PyObject,
    ) -> PyResult<Args<'a, N>> {
        debug_assert_eq!(N, self.names.len());
        let nargs = nargs(nargsf);
        let mut out: [Option<Borrowed<'a>>; N] = [None; N];
        if nargs > N {
            return Err(PyErr::type_error(format!(
                "{}() takes at most {} argument{} ({} given)",
                self.fname,
                N,
                if N == 1 { "" } else { "s" },
                nargs
            )));
        }
        // SAFETY: forwarded contract: `nargs` positional arguments.
        let positional = unsafe { positional(args, nargsf) };
        for (slot, &arg) in out.iter_mut().zip(positional) {
            // SAFETY: CPython's arguments are live objects for the call.
            *slot = Some(unsafe { Borrowed::from_ptr(arg) });
        }
        let nkw = if kwnames.is_null() {
            0
        } else {
            // SAFETY: a non-NULL `kwnames` is a tuple of str (vectorcall).
            usize_of(unsafe { PyTuple_GET_SIZE(kwnames) })
        };
        if nkw > 0 && !self.keywords {
            return Err(PyErr::type_error(format!(
                "{}() takes no keyword arguments",
                self.fname
            )));
        }
        for k in 0..nkw {
            // SAFETY: `k < len(kwnames)`; the keyword values follow the
            // positional ones in `args` (vectorcall convention), so
            // `args[nargs + k]` exists; all are live objects for the call.
            let (key, value) = unsafe {
                (
                    Borrowed::from_ptr(PyTuple_GET_ITEM(kwnames, ssize(k))),
                    Borrowed::from_ptr(*args.add(nargs + k)),
                )
            };
            let name = str_of(key).unwrap_or_default();
            match self.names.iter().position(|n| *n == name) {
                Some(i) if i < nargs => {
                    return Err(PyErr::type_error(format!(
                        "argument for {}() given by name ('{}') and position ({})",
                        self.fname,
                        name,
                        i + 1
                    )))
                }
                Some(i) => out[i] = Some(value),
                None => {
                    return Err(PyErr::type_error(format!(
                        "'{}' is an invalid keyword argument for {}()",
                        name, self.fname
                    )))
                }
            }
        }
        for (i, slot) in out.iter().enumerate().take(self.required) {
            if slot.is_none() {
                return Err(PyErr::type_error(format!(
                    "{}() missing required argument '{}' (pos {})",
                    self.fname,
                    self.names[i],
                    i + 1
                )));
            }
        }
        Ok(Args(out))
    }

    /// Parses classic `(args_tuple, kwargs_dict)` arguments (for `tp_new`).
    ///
    /// # Safety
    /// `args` must be a tuple, `kwargs` NULL or a dict, both alive for `'a`;
    /// caller attached.
    pub unsafe fn parse_tuple<'a, const N: usize>(
        &self,
        args: *mut PyObject,
        kwargs: *mut PyObject,
    ) -> PyResult<Args<'a, N>> {
        // SAFETY: `args` is a tuple (caller's contract).
        let nargs = usize_of(unsafe { PyTuple_GET_SIZE(args) });
        let mut flat: Vec<*mut PyObject> = (0..nargs)
            // SAFETY: `i < len(args)`.
            .map(|i| unsafe { PyTuple_GET_ITEM(args, ssize(i)) })
            .collect();
        let mut names: Vec<Owned> = Vec::new();
        if !kwargs.is_null() {
            let mut pos: Py_ssize_t = 0;
            let mut k: *mut PyObject = std::ptr::null_mut();
            let mut v: *mut PyObject = std::ptr::null_mut();
            // SAFETY: iterating a dict (caller's contract) with valid
            // out-pointers; the borrowed keys/values live as long as it.
            while unsafe { PyDict_Next(kwargs, &raw mut pos, &raw mut k, &raw mut v) } != 0 {
                // SAFETY: `k` is a live key of the dict.
                names.push(unsafe { Owned::from_borrowed(k) });
                flat.push(v);
            }
        }
        let kwnames = if names.is_empty() {
            None
        } else {
            Some(crate::py::py_tuple(names)?)
        };
        // SAFETY: `flat` holds the positional then keyword values, `kwnames`
        // the keyword names, all borrowed from `args`/`kwargs`, which outlive
        // 'a — the vectorcall shape `parse` expects.
        let parsed = unsafe {
            self.parse::<N>(
                flat.as_ptr(),
                ssize(nargs),
                kwnames.as_ref().map_or(std::ptr::null_mut(), Owned::as_ptr),
            )?
        };
        Ok(Args(parsed.0))
    }

    /// A parameter `parse` guarantees (a required one), as a value: an
    /// internal error instead of a panic should that ever not hold.
    #[inline]
    pub fn req(a: Option<Borrowed<'_>>) -> PyResult<Borrowed<'_>> {
        a.ok_or_else(|| PyErr::new(Exc::SystemError, "caio: required argument missing"))
    }
}

/// Rejects any argument (for methods that take none).
///
/// # Safety
/// Arguments straight from CPython's vectorcall.
pub unsafe fn no_args(fname: &str, nargsf: Py_ssize_t, kwnames: *mut PyObject) -> PyResult<()> {
    let nargs = nargs(nargsf);
    let nkw = if kwnames.is_null() {
        0
    } else {
        // SAFETY: a non-NULL `kwnames` is a tuple (vectorcall convention).
        usize_of(unsafe { PyTuple_GET_SIZE(kwnames) })
    };
    if nargs != 0 || nkw != 0 {
        return Err(PyErr::type_error(format!(
            "{}() takes no arguments ({} given)",
            fname,
            nargs + nkw
        )));
    }
    Ok(())
}

/// `operator.index(obj)` converted to `i128` (enough for every range we
/// accept: −2⁶³ … 2⁶⁴−1); values outside that raise `OverflowError`.
pub fn to_i128(obj: Borrowed<'_>, name: &str) -> PyResult<i128> {
    // SAFETY: attached (crate invariant); a live object.
    let idx = unsafe { Owned::from_new(PyNumber_Index(obj.as_ptr()))? };
    let mut overflow = 0;
    // SAFETY: attached; `idx` is an int.
    let v = unsafe { PyLong_AsLongLongAndOverflow(idx.as_ptr(), &raw mut overflow) };
    if overflow == 0 {
        // SAFETY: attached.
        if v == -1 && !unsafe { PyErr_Occurred() }.is_null() {
            return Err(PyErr::Fetched);
        }
        return Ok(i128::from(v));
    }
    if overflow > 0 {
        // SAFETY: attached; `idx` is an int.
        let u = unsafe { PyLong_AsUnsignedLongLong(idx.as_ptr()) };
        // SAFETY: attached.
        if u == u64::MAX && !unsafe { PyErr_Occurred() }.is_null() {
            crate::py::clear_error();
        } else {
            return Ok(i128::from(u));
        }
    }
    Err(out_of_range(name, idx.borrow()))
}

fn out_of_range(name: &str, value: Borrowed<'_>) -> PyErr {
    PyErr::overflow(format!("{} is out of range: {}", name, value.repr()))
}

/// An integer argument that must lie in `min..=max`.
pub fn int_in(obj: Borrowed<'_>, name: &str, min: i128, max: i128) -> PyResult<i128> {
    let v = to_i128(obj, name)?;
    if v < min || v > max {
        return Err(PyErr::overflow(format!(
            "{} must be in range {}..{}, got {}",
            name, min, max, v
        )));
    }
    Ok(v)
}

/// [`int_in`] with the bounds and the result typed: an integer argument of
/// type `T` in `min..=max` (`OverflowError` outside).
pub fn int_as<T>(obj: Borrowed<'_>, name: &str, min: T, max: T) -> PyResult<T>
where
    T: Copy + Into<i128> + TryFrom<i128>,
{
    let v = int_in(obj, name, min.into(), max.into())?;
    // In range by `int_in`, so the conversion cannot fail.
    T::try_from(v).map_err(|_| PyErr::overflow(format!("{} is out of range: {}", name, v)))
}

/// A file descriptor: any value of the C `int`/`unsigned int` range. Values
/// that would alias another descriptor (≥ 2³² or < −2³¹) raise
/// `OverflowError`; negative ones (−1) are accepted and fail later with EBADF,
/// as upstream does; `fileno` shows them as unsigned 32-bit.
pub fn fd_arg(obj: Borrowed<'_>) -> PyResult<u32> {
    let v = int_in(obj, "fd", i128::from(i32::MIN), i128::from(u32::MAX))?;
    // In range: the raw 32 bits (−1 is 0xffff_ffff).
    Ok(crate::num::low_u64(v) as u32)
}

/// Truthiness of an object (`bool(obj)`).
pub fn truthy(obj: Borrowed<'_>) -> PyResult<bool> {
    // SAFETY: attached (crate invariant); a live object.
    match unsafe { PyObject_IsTrue(obj.as_ptr()) } {
        -1 => Err(PyErr::Fetched),
        v => Ok(v != 0),
    }
}

/// Interns a C string name for use as a keyword/attribute.
pub fn cstr_name(s: &'static CStr) -> &'static str {
    s.to_str().unwrap_or("?")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: zero-argument vectorcalls may pass `args == NULL`
    /// (`PyObject_CallNoArgs`, `iter(callable, sentinel)`), and
    /// `slice::from_raw_parts(NULL, 0)` is undefined behaviour (debug builds
    /// abort on it). `positional` must not build a slice from it.
    #[test]
    fn positional_accepts_null_args_for_zero_arguments() {
        // SAFETY: the shape CPython uses for a zero-argument call.
        let s = unsafe { positional(std::ptr::null(), 0) };
        assert!(s.is_empty());
        // With the "arguments offset" flag set and still no arguments.
        let flag = Py_ssize_t::MIN; // PY_VECTORCALL_ARGUMENTS_OFFSET as a signed nargsf
                                    // SAFETY: as above.
        let s = unsafe { positional(std::ptr::null(), flag) };
        assert!(s.is_empty());
        let one = [std::ptr::NonNull::<PyObject>::dangling().as_ptr()];
        // SAFETY: one (never dereferenced) pointer at a live array.
        let s = unsafe { positional(one.as_ptr(), 1) };
        assert_eq!(s.len(), 1);
    }
}
