//! Curve25519 keys as WireGuard writes them (32 bytes, standard base64), the node's private
//! key file (mode 0600, written whole: temp file + rename), and its public key.

use std::fmt;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use gotatun::x25519::{PublicKey, StaticSecret};

use crate::WgError;

/// A WireGuard key (private or public).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(pub [u8; 32]);

impl Key {
    /// A new private key from the OS's random source.
    pub fn generate() -> Key {
        // x25519 clamps the scalar when it is used.
        Key(StaticSecret::from(rand::random::<[u8; 32]>()).to_bytes())
    }

    /// The public key of this private key.
    pub fn public(&self) -> Key {
        Key(PublicKey::from(&StaticSecret::from(self.0)).to_bytes())
    }

    pub(crate) fn secret(&self) -> StaticSecret {
        StaticSecret::from(self.0)
    }

    pub(crate) fn public_key(&self) -> PublicKey {
        PublicKey::from(self.0)
    }

    /// The base64 form (what `wg` prints).
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

/// Never prints the bytes: a private key must not end up in a log.
impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({}…)", &self.to_base64()[..6])
    }
}

impl FromStr for Key {
    type Err = WgError;
    fn from_str(s: &str) -> Result<Key, WgError> {
        let bytes = STANDARD
            .decode(s.trim())
            .map_err(|e| WgError::Key(format!("{s:?} is not base64: {e}")))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| WgError::Key(format!("{} bytes, not 32", b.len())))?;
        Ok(Key(arr))
    }
}

/// Reads the private key at `path`, or makes one there (mode 0600) when there is none.
/// Returns the key and whether it was made. A key file others can read is refused.
pub fn load_or_create(path: &Path) -> Result<(Key, bool), WgError> {
    let io = |what: String| move |source| WgError::Io { what, source };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let mode = std::fs::metadata(path)
                .map_err(io(format!("reading {}", path.display())))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(WgError::Key(format!(
                    "{} has mode {:o}: a private key must be 0600",
                    path.display(),
                    mode & 0o777
                )));
            }
            Ok((text.parse()?, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Key::generate();
            store(path, &key)?;
            Ok((key, true))
        }
        Err(e) => Err(WgError::Io {
            what: format!("reading {}", path.display()),
            source: e,
        }),
    }
}

/// Writes `key` to `path` whole (temp file 0600, fsync, rename).
pub fn store(path: &Path, key: &Key) -> Result<(), WgError> {
    let io = |what: String| move |source| WgError::Io { what, source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(format!("creating {}", tmp.display())))?;
    writeln!(f, "{key}")
        .and_then(|()| f.sync_all())
        .map_err(io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("renaming {}", tmp.display())))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_files_are_private() {
        let k = Key::generate();
        assert_ne!(k, Key::generate());
        let back: Key = k.to_base64().parse().unwrap();
        assert_eq!(back, k);
        assert_eq!(k.public(), back.public());
        assert!(
            !format!("{k:?}").contains(&k.to_base64()),
            "Debug hides the key"
        );
        assert!("AAAA".parse::<Key>().is_err());
        assert!("not base64!".parse::<Key>().is_err());

        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("wg/private.key");
        let (a, made) = load_or_create(&p).unwrap();
        assert!(made);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (b, made) = load_or_create(&p).unwrap();
        assert!(!made);
        assert_eq!(a, b);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_create(&p).unwrap_err();
        assert!(e.to_string().contains("0600"), "{e}");
    }

    /// The public key of a known private key (RFC 7748's test vector, Alice).
    #[test]
    fn public_key_matches_rfc7748() {
        let hex = |s: &str| -> [u8; 32] {
            let v: Vec<u8> = (0..32)
                .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            v.try_into().unwrap()
        };
        let alice = Key(hex(
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        ));
        assert_eq!(
            alice.public().0,
            hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
        );
    }
}
