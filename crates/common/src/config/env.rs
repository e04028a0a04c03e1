//! Reading one `FERROCLAW_*` override: every section parses its variables through these, so
//! a bad value is refused with the variable named.

use std::net::SocketAddr;

use super::ConfigError;

/// How sections read the environment (the process's, or a test's map).
pub(super) type Get<'a> = &'a dyn Fn(&str) -> Option<String>;

/// `value` of `var` as a `T`.
pub(super) fn parse<T: std::str::FromStr>(var: &str, value: &str) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    value.parse().map_err(|e: T::Err| ConfigError::Env {
        var: var.into(),
        message: format!("{value:?}: {e}"),
    })
}

/// A listen address: `ip:port`, or `name:port` resolved now, so a container can bind to its
/// address on one network only (compose's per-network aliases).
pub(super) fn listen_addr(var: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(addr) = value.parse() {
        return Ok(addr);
    }
    use std::net::ToSocketAddrs;
    let error = |message: String| ConfigError::Env {
        var: var.into(),
        message: format!("{value:?}: {message}"),
    };
    let mut found = value.to_socket_addrs().map_err(|e| {
        error(format!(
            "not an address, and the name does not resolve: {e}"
        ))
    })?;
    found
        .next()
        .ok_or_else(|| error("the name resolves to no address".into()))
}
