//! Argument parsing for `METH_FASTCALL | METH_KEYWORDS` functions and the
//! integer conversions every constructor uses.
//!
//! Integer arguments follow CPython's rules (anything with `__index__`; `bool`
//! works; `float`/`str`/`None` raise `TypeError`). Unlike upstream caio, values
//! are range-checked instead of silently wrapping (API.md §7 Q3): an fd of
//! `2**32 + 5` must not become fd 5, `nbytes=2**64` must not become 0.

use std::ffi::CStr;

use pyo3_ffi::*;

use crate::py::{str_of, Borrowed, Owned, PyErr, PyResult};

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

/// Parsed arguments: `N` slots, `None` for parameters not given.
pub struct Args<'a, const N: usize>(pub [Option<Borrowed<'a>>; N]);

impl<'a, const N: usize> Args<'a, N> {
    #[inline]
    pub fn get(&self, i: usize) -> Option<Borrowed<'a>> {
        self.0[i]
    }
}

impl Params {
    /// Parses a vectorcall argument vector.
    ///
    /// # Safety
    /// `args`/`nargsf`/`kwnames` must come straight from CPython's vectorcall.
    pub unsafe fn parse<'a, const N: usize>(
        &self,
        args: *const *mut PyObject,
        nargsf: Py_ssize_t,
        kwnames: *mut PyObject,
    ) -> PyResult<Args<'a, N>> {
        debug_assert_eq!(N, self.names.len());
        let nargs = PyVectorcall_NARGS(nargsf as usize) as usize;
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
        for (i, slot) in out.iter_mut().enumerate().take(nargs) {
            *slot = Some(Borrowed::from_ptr(*args.add(i)));
        }
        if !kwnames.is_null() {
            let nkw = PyTuple_GET_SIZE(kwnames) as usize;
            if nkw > 0 && !self.keywords {
                return Err(PyErr::type_error(format!(
                    "{}() takes no keyword arguments",
                    self.fname
                )));
            }
            for k in 0..nkw {
                let key = Borrowed::from_ptr(PyTuple_GET_ITEM(kwnames, k as Py_ssize_t));
                let value = Borrowed::from_ptr(*args.add(nargs + k));
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
}

impl Params {
    /// Parses classic `(args_tuple, kwargs_dict)` arguments (for `tp_new`).
    ///
    /// # Safety
    /// `args` must be a tuple, `kwargs` NULL or a dict, both alive for `'a`.
    pub unsafe fn parse_tuple<'a, const N: usize>(
        &self,
        args: *mut PyObject,
        kwargs: *mut PyObject,
    ) -> PyResult<Args<'a, N>> {
        let nargs = PyTuple_GET_SIZE(args) as usize;
        let mut flat: Vec<*mut PyObject> = (0..nargs)
            .map(|i| PyTuple_GET_ITEM(args, i as Py_ssize_t))
            .collect();
        let mut names: Vec<Owned> = Vec::new();
        if !kwargs.is_null() {
            let mut pos: Py_ssize_t = 0;
            let mut k: *mut PyObject = std::ptr::null_mut();
            let mut v: *mut PyObject = std::ptr::null_mut();
            while PyDict_Next(kwargs, &mut pos, &mut k, &mut v) != 0 {
                names.push(Owned::from_borrowed(k));
                flat.push(v);
            }
        }
        let kwnames = if names.is_empty() {
            None
        } else {
            Some(crate::py::py_tuple(names)?)
        };
        let parsed = self.parse::<N>(
            flat.as_ptr(),
            nargs as Py_ssize_t,
            kwnames
                .as_ref()
                .map_or(std::ptr::null_mut(), |t| t.as_ptr()),
        )?;
        // The values are borrowed from `args`/`kwargs`, which outlive 'a.
        Ok(Args(parsed.0))
    }
}

/// Rejects any argument (for methods that take none).
/// # Safety
/// Arguments straight from CPython's vectorcall.
pub unsafe fn no_args(fname: &str, nargsf: Py_ssize_t, kwnames: *mut PyObject) -> PyResult<()> {
    let nargs = PyVectorcall_NARGS(nargsf as usize);
    let nkw = if kwnames.is_null() {
        0
    } else {
        PyTuple_GET_SIZE(kwnames)
    };
    if nargs != 0 || nkw != 0 {
        return Err(PyErr::type_error(format!(
            "{}() takes no arguments ({} given)",
            fname,
            nargs as isize + nkw
        )));
    }
    Ok(())
}

/// `operator.index(obj)` converted to `i128` (enough for every range we
/// accept: −2⁶³ … 2⁶⁴−1); values outside that raise `OverflowError`.
pub fn to_i128(obj: Borrowed<'_>, name: &str) -> PyResult<i128> {
    unsafe {
        let idx = Owned::from_new(PyNumber_Index(obj.as_ptr()))?;
        let mut overflow = 0;
        let v = PyLong_AsLongLongAndOverflow(idx.as_ptr(), &mut overflow);
        if overflow == 0 {
            if v == -1 && !PyErr_Occurred().is_null() {
                return Err(PyErr::Fetched);
            }
            return Ok(v as i128);
        }
        if overflow > 0 {
            let u = PyLong_AsUnsignedLongLong(idx.as_ptr());
            if u == u64::MAX && !PyErr_Occurred().is_null() {
                PyErr_Clear();
            } else {
                return Ok(u as i128);
            }
        }
        Err(out_of_range(name, idx.borrow()))
    }
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

/// A file descriptor: any value of the C `int`/`unsigned int` range. Values
/// that would alias another descriptor (≥ 2³² or < −2³¹) raise
/// `OverflowError`; negative ones (−1) are accepted and fail later with EBADF,
/// as upstream does; `fileno` shows them as unsigned 32-bit.
pub fn fd_arg(obj: Borrowed<'_>) -> PyResult<u32> {
    Ok(int_in(obj, "fd", i32::MIN as i128, u32::MAX as i128)? as u32)
}

/// Truthiness of an object (`bool(obj)`).
pub fn truthy(obj: Borrowed<'_>) -> PyResult<bool> {
    match unsafe { PyObject_IsTrue(obj.as_ptr()) } {
        -1 => Err(PyErr::Fetched),
        v => Ok(v != 0),
    }
}

/// Interns a C string name for use as a keyword/attribute.
pub fn cstr_name(s: &'static CStr) -> &'static str {
    s.to_str().unwrap_or("?")
}
