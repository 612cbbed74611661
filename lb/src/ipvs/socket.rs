//! The IPVS side of the shared netlink socket ([`crate::netlink`]): a `NETLINK_GENERIC`
//! socket, and request failures mapped to [`IpvsError`].

use super::IpvsError;
use crate::netlink;

pub use netlink::NlSocket;

pub type ReqError = netlink::ReqError<IpvsError>;

/// A `NETLINK_GENERIC` socket in the calling thread's network namespace.
pub fn open() -> Result<NlSocket, IpvsError> {
    NlSocket::open(libc::NETLINK_GENERIC).map_err(|e| IpvsError::Io {
        what: e.what,
        source: e.source,
    })
}

impl netlink::ReqError<IpvsError> {
    pub fn into_ipvs(self, op: &'static str, what: String) -> IpvsError {
        match self {
            ReqError::Errno(e) => IpvsError::from_errno(op, what, e),
            ReqError::Io(w, source) => IpvsError::Io { what: w, source },
            ReqError::Other(e) => e,
        }
    }
}
