//! Test-only environment hooks.
//!
//! The test suite makes a backend believe things about its environment
//! ("the kernel is 4.9", "`io_uring_setup` fails with EPERM") through
//! `CAIO_TEST_*` environment variables. Release builds must not honour them,
//! so they are read only when caio-core is built with the `test-hooks`
//! cargo feature; otherwise [`env()`](fn@env) is always `None` and costs nothing.

/// The value of the test hook `name` (a `CAIO_TEST_*` variable), `None` when
/// unset, empty, or when built without the `test-hooks` feature.
pub fn env(name: &str) -> Option<String> {
    debug_assert!(name.starts_with("CAIO_TEST_"), "{name}");
    #[cfg(feature = "test-hooks")]
    {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
    #[cfg(not(feature = "test-hooks"))]
    {
        let _ = name;
        None
    }
}

/// [`env()`](fn@env) parsed (surrounding whitespace ignored); `None` if absent or
/// unparsable.
pub fn env_parse<T: std::str::FromStr>(name: &str) -> Option<T> {
    env(name).and_then(|v| v.trim().parse().ok())
}

/// Whether the hooks are compiled in.
pub const ENABLED: bool = cfg!(feature = "test-hooks");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_follow_the_feature() {
        // (No set_var: other test threads may read the environment.)
        let name = "CAIO_TEST_CORE_SELFTEST";
        let expected = if ENABLED {
            std::env::var(name).ok().filter(|v| !v.is_empty())
        } else {
            None
        };
        assert_eq!(env(name), expected);
        assert_eq!(env_parse::<i32>("CAIO_TEST_CORE_UNSET_HOOK"), None);
    }
}
