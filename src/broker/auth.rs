//! Password file: one `user:hash` per line, in Mosquitto's formats so existing files work.
//!
//! `$7$<iterations>$<salt b64>$<hash b64>` is PBKDF2-HMAC-SHA512 (what `sensorgate passwd` and
//! `mosquitto_passwd` write); `$6$<salt b64>$<hash b64>` is Mosquitto's older salted SHA-512.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::{Digest, Sha512};

/// PBKDF2 rounds for new entries: about 10 ms on a Raspberry Pi 4, paid once per CONNECT.
pub const ITERATIONS: u32 = 10_000;
const SALT_LEN: usize = 12;
const HASH_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum PasswdError {
    #[error("{path}:{line}: {message}")]
    Parse {
        path: String,
        line: usize,
        message: String,
    },
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("user names may not be empty or contain ':' or line breaks")]
    BadUser,
    #[error("no random numbers available for the salt: {0}")]
    Random(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Hash {
    Pbkdf2 {
        iterations: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    Sha512 {
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
}

/// The users allowed to connect, with their password hashes.
#[derive(Debug, Default, Clone)]
pub struct PasswordFile {
    users: BTreeMap<String, Hash>,
}

impl PasswordFile {
    pub fn load(path: &Path) -> Result<PasswordFile, PasswdError> {
        let text = std::fs::read_to_string(path).map_err(|source| PasswdError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Like [`load`](Self::load), but a missing file is an empty one (for `sensorgate passwd`).
    pub fn load_or_empty(path: &Path) -> Result<PasswordFile, PasswdError> {
        if path.exists() {
            Self::load(path)
        } else {
            Ok(PasswordFile::default())
        }
    }

    pub fn parse(text: &str, path: &str) -> Result<PasswordFile, PasswdError> {
        let mut users = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |message: &str| PasswdError::Parse {
                path: path.to_string(),
                line: i + 1,
                message: message.to_string(),
            };
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| err("expected `user:hash`"))?;
            let hash = parse_hash(hash).ok_or_else(|| {
                err("the hash is not in a known format; recreate it with `sensorgate passwd`")
            })?;
            users.insert(user.to_string(), hash);
        }
        Ok(PasswordFile { users })
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Adds or replaces a user with a fresh salt.
    pub fn set(&mut self, user: &str, password: &str) -> Result<(), PasswdError> {
        if user.is_empty() || user.contains([':', '\n', '\r']) {
            return Err(PasswdError::BadUser);
        }
        let mut salt = vec![0u8; SALT_LEN];
        getrandom::fill(&mut salt).map_err(|e| PasswdError::Random(e.to_string()))?;
        let hash = pbkdf2_sha512(password.as_bytes(), &salt, ITERATIONS);
        self.users.insert(
            user.to_string(),
            Hash::Pbkdf2 {
                iterations: ITERATIONS,
                salt,
                hash,
            },
        );
        Ok(())
    }

    pub fn remove(&mut self, user: &str) -> bool {
        self.users.remove(user).is_some()
    }

    /// Writes the file atomically (temporary file, fsync, rename), readable by its owner only.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let mut text = String::new();
        for (user, hash) in &self.users {
            let h = match hash {
                Hash::Pbkdf2 {
                    iterations,
                    salt,
                    hash,
                } => {
                    format!("$7${iterations}${}${}", B64.encode(salt), B64.encode(hash))
                }
                Hash::Sha512 { salt, hash } => {
                    format!("$6${}${}", B64.encode(salt), B64.encode(hash))
                }
            };
            text.push_str(&format!("{user}:{h}\n"));
        }
        crate::broker::store::write_atomically(path, text.as_bytes(), 0o600)
    }

    /// Checks a user's password; slow on purpose (PBKDF2), so call it off the event loop.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        match self.users.get(user) {
            Some(Hash::Pbkdf2 {
                iterations,
                salt,
                hash,
            }) => constant_time_eq(&pbkdf2_sha512(password, salt, *iterations), hash),
            Some(Hash::Sha512 { salt, hash }) => {
                let mut d = Sha512::new();
                d.update(password);
                d.update(salt);
                constant_time_eq(&d.finalize(), hash)
            }
            None => false,
        }
    }
}

fn parse_hash(s: &str) -> Option<Hash> {
    let parts: Vec<&str> = s.split('$').collect();
    match parts.as_slice() {
        ["", "7", iterations, salt, hash] => Some(Hash::Pbkdf2 {
            iterations: iterations.parse().ok().filter(|&n| n > 0)?,
            salt: B64.decode(salt).ok()?,
            hash: B64.decode(hash).ok().filter(|h| h.len() == HASH_LEN)?,
        }),
        ["", "6", salt, hash] => Some(Hash::Sha512 {
            salt: B64.decode(salt).ok()?,
            hash: B64.decode(hash).ok().filter(|h| h.len() == HASH_LEN)?,
        }),
        _ => None,
    }
}

fn pbkdf2_sha512(password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
    let mut out = vec![0u8; HASH_LEN];
    pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, iterations, &mut out);
    out
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_password_verifies_and_a_wrong_one_does_not() {
        let mut pw = PasswordFile::default();
        pw.set("alice", "s3cret").unwrap();
        assert!(pw.verify("alice", b"s3cret"));
        assert!(!pw.verify("alice", b"s3cret "));
        assert!(!pw.verify("bob", b"s3cret"));
    }

    #[test]
    fn a_saved_file_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        let mut pw = PasswordFile::default();
        pw.set("alice", "one").unwrap();
        pw.set("bob", "two").unwrap();
        pw.save(&path).unwrap();
        let back = PasswordFile::load(&path).unwrap();
        assert_eq!(back.len(), 2);
        assert!(back.verify("bob", b"two"));
    }

    #[test]
    fn a_mosquitto_sha512_entry_is_accepted() {
        // Built here: salt "0123456789ab", hash = sha512("pw" + salt).
        let salt = b"0123456789ab";
        let mut d = Sha512::new();
        d.update(b"pw");
        d.update(salt);
        let line = format!("u:$6${}${}\n", B64.encode(salt), B64.encode(d.finalize()));
        let pw = PasswordFile::parse(&line, "p").unwrap();
        assert!(pw.verify("u", b"pw"));
    }

    #[test]
    fn a_malformed_line_names_its_line() {
        let e = PasswordFile::parse("# users\nalice:$7$x$y$z\n", "passwd").unwrap_err();
        assert!(e.to_string().starts_with("passwd:2:"), "{e}");
    }
}
