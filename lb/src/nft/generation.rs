//! The nf_tables generation of a network namespace: a counter the kernel bumps on every
//! committed ruleset change, whoever makes it. Reading it is one netlink round trip, so a
//! reconciler can tell "nothing changed since my last write" without listing a table — the
//! cheap first step of drift detection (`nft flush ruleset`, a firewall reload).

use std::collections::HashMap;
use std::io;

use crate::LbError;
use crate::netlink::{Msg, NLM_F_ACK, NLM_F_REQUEST, NlSocket, ReqError, attrs};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;
const NFTA_GEN_ID: u16 = 1;

/// The generation of one namespace, as read.
pub type Generation = u32;

/// Reads nf_tables generations, keeping one nfnetlink socket per namespace (a socket stays in
/// the namespace it was opened in, so later reads need no thread switch).
#[derive(Debug, Default)]
pub struct GenerationReader {
    /// netns -> (the namespace's inode when the socket was opened, the socket)
    sockets: HashMap<String, (u64, NlSocket)>,
    seq: u32,
}

/// The inode of the namespace file: a namespace deleted and made again under the same name
/// has another one (a socket of the old one would go on reading the old namespace).
fn ns_inode(netns: &str) -> Result<u64, LbError> {
    use std::os::unix::fs::MetadataExt;
    let p = if netns.contains('/') {
        std::path::PathBuf::from(netns)
    } else {
        shoal_netns::path(netns)
    };
    std::fs::metadata(&p)
        .map(|m| m.ino())
        .map_err(|e| gen_error(netns, format!("stat {}", p.display()), e))
}

fn gen_error(netns: &str, what: String, source: io::Error) -> LbError {
    LbError::Generation {
        netns: netns.to_string(),
        what,
        source,
    }
}

/// The GETGEN request (nfgenmsg: AF_UNSPEC, version 0, res_id 0).
fn request(seq: u32) -> Vec<u8> {
    Msg::new(
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        [0, 0, 0, 0],
    )
    .finish()
}

/// NFTA_GEN_ID of a NEWGEN payload (after the 4-byte nfgenmsg).
fn parse_gen(payload: &[u8]) -> Option<Generation> {
    let a = attrs(payload.get(4..)?).ok()?;
    a.iter()
        .find(|(ty, _)| *ty == NFTA_GEN_ID)
        .and_then(|(_, v)| Some(u32::from_be_bytes((*v).try_into().ok()?)))
}

impl GenerationReader {
    pub fn new() -> GenerationReader {
        GenerationReader::default()
    }

    /// The current generation of `netns`. Generations of two namespaces are unrelated, and a
    /// namespace made anew starts again from a low number: compare a namespace only with
    /// itself, and together with [`GenerationReader::read`]'s inode check. Blocking (one round trip; the first read of a
    /// namespace opens its socket on a thread inside it). A failed read drops the socket, so
    /// a namespace that was deleted and recreated under the same name is read afresh.
    pub fn read(&mut self, netns: &str) -> Result<Generation, LbError> {
        let ino = ns_inode(netns)?;
        if self.sockets.get(netns).is_none_or(|(i, _)| *i != ino) {
            let sock = shoal_netns::run_in(netns, || NlSocket::open(libc::NETLINK_NETFILTER))?
                .map_err(|e| gen_error(netns, format!("netlink socket ({})", e.what), e.source))?;
            self.sockets.insert(netns.to_string(), (ino, sock));
        }
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let (_, sock) = self.sockets.get_mut(netns).expect("inserted above");
        let mut gen_id = None;
        let res = sock.request(&request(seq), seq, |m| {
            if m.ty == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN {
                gen_id = parse_gen(m.payload);
            }
            Ok::<(), crate::netlink::DecodeError>(())
        });
        let res = match res {
            Ok(()) => gen_id.ok_or_else(|| {
                gen_error(
                    netns,
                    "GETGEN".into(),
                    io::Error::other("reply without a generation id"),
                )
            }),
            Err(ReqError::Errno(code)) => Err(gen_error(
                netns,
                "GETGEN".into(),
                io::Error::from_raw_os_error(code),
            )),
            Err(ReqError::Io(what, e)) => Err(gen_error(netns, what.into(), e)),
            Err(ReqError::Other(e)) => Err(gen_error(netns, "GETGEN".into(), io::Error::other(e))),
        };
        if res.is_err() {
            self.sockets.remove(netns);
        }
        res
    }

    /// Drops the socket of `netns` (the namespace is gone).
    pub fn forget(&mut self, netns: &str) {
        self.sockets.remove(netns);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_is_a_getgen_with_ack() {
        let r = request(7);
        assert_eq!(r.len(), 20);
        assert_eq!(u16::from_ne_bytes([r[4], r[5]]), 0x0a10);
        assert_eq!(u16::from_ne_bytes([r[6], r[7]]), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32::from_ne_bytes(r[8..12].try_into().unwrap()), 7);
    }

    #[test]
    fn parses_the_generation_id_and_refuses_garbage() {
        // nfgenmsg + NFTA_GEN_ID (be32 0x01020304) + NFTA_GEN_PROC_PID
        let mut p = vec![0, 0, 0, 0];
        p.extend_from_slice(&8u16.to_ne_bytes());
        p.extend_from_slice(&1u16.to_ne_bytes());
        p.extend_from_slice(&[1, 2, 3, 4]);
        p.extend_from_slice(&8u16.to_ne_bytes());
        p.extend_from_slice(&2u16.to_ne_bytes());
        p.extend_from_slice(&[0, 0, 0, 9]);
        assert_eq!(parse_gen(&p), Some(0x01020304));
        assert_eq!(parse_gen(&p[..4]), None);
        assert_eq!(parse_gen(&[1, 2]), None);
        let mut bad = p.clone();
        bad[4] = 200; // attribute longer than the payload
        assert_eq!(parse_gen(&bad), None);
    }
}
