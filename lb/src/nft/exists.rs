//! Whether an nf_tables table or set exists in a namespace, asked over netlink
//! (NFT_MSG_GETTABLE / NFT_MSG_GETSET): the kernel answers ENOENT for a missing one. This
//! tells "the table is not there" from any other failure of an `nft list` by the errno,
//! not by the text nft printed.

use std::io;

use crate::LbError;
use crate::netlink::{Msg, NLM_F_ACK, NLM_F_REQUEST, NlSocket, ReqError};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_GETSET: u16 = 10;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFPROTO_IPV4: u8 = 2;

/// An object of the `ip` family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    Table(String),
    /// A map (`table`, `name`); sets and maps are both asked with NFT_MSG_GETSET.
    Map(String, String),
}

impl Object {
    /// The GET request, asking for an ACK (nfgenmsg: family ip, version 0, res_id 0).
    fn request(&self, seq: u32) -> Vec<u8> {
        let hdr = [NFPROTO_IPV4, 0, 0, 0];
        match self {
            Object::Table(t) => {
                let mut m = Msg::new(
                    (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE,
                    NLM_F_REQUEST | NLM_F_ACK,
                    seq,
                    hdr,
                );
                m.str(NFTA_TABLE_NAME, t);
                m.finish()
            }
            Object::Map(t, s) => {
                let mut m = Msg::new(
                    (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSET,
                    NLM_F_REQUEST | NLM_F_ACK,
                    seq,
                    hdr,
                );
                m.str(NFTA_SET_TABLE, t).str(NFTA_SET_NAME, s);
                m.finish()
            }
        }
    }
}

impl std::fmt::Display for Object {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Object::Table(t) => write!(f, "table ip {t}"),
            Object::Map(t, s) => write!(f, "map ip {t} {s}"),
        }
    }
}

/// Whether `object` exists in `netns`. Blocking: opens a netlink socket on a thread inside
/// the namespace and makes one round trip.
pub fn exists(netns: &str, object: &Object) -> Result<bool, LbError> {
    let err = |what: String, source: io::Error| LbError::Lookup {
        netns: netns.to_string(),
        object: object.to_string(),
        what,
        source,
    };
    let mut sock = shoal_netns::run_in(netns, || NlSocket::open(libc::NETLINK_NETFILTER))?
        .map_err(|e| err(format!("netlink socket ({})", e.what), e.source))?;
    let res = sock.request(&object.request(1), 1, |_| {
        Ok::<(), crate::netlink::DecodeError>(())
    });
    match res {
        Ok(()) => Ok(true),
        Err(ReqError::Errno(libc::ENOENT)) => Ok(false),
        Err(ReqError::Errno(code)) => Err(err("GET".into(), io::Error::from_raw_os_error(code))),
        Err(ReqError::Io(what, e)) => Err(err(what.into(), e)),
        Err(ReqError::Other(e)) => Err(err("GET".into(), io::Error::other(e.0))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_name_the_object_and_ask_for_an_ack() {
        let r = Object::Table("shoal_lb".into()).request(3);
        assert_eq!(u16::from_ne_bytes([r[4], r[5]]), 0x0a01);
        assert_eq!(u16::from_ne_bytes([r[6], r[7]]), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(r[16], NFPROTO_IPV4);
        assert!(r.windows(9).any(|w| w == b"shoal_lb\0"));
        let r = Object::Map("shoal_lb".into(), "affinity".into()).request(4);
        assert_eq!(u16::from_ne_bytes([r[4], r[5]]), 0x0a0a);
        assert!(r.windows(9).any(|w| w == b"affinity\0"));
    }
}
