//! The single-use join tokens already redeemed, kept in the CA directory's
//! `used-tokens` file (mode 0600) so a restart does not make them usable
//! again. One line per token: `<nonce> <expiry, Unix seconds>`. Entries
//! whose token has expired are dropped: an expired token is refused anyway.
//!
//! One `weft-ca serve` per CA directory: two servers sharing a directory
//! would each keep their own list and could both redeem a token.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::{files, CaError};

/// The file name inside the CA directory.
pub const USED_TOKENS_FILE: &str = "used-tokens";

const HEADER: &str =
    "# weft-ca: single-use join tokens already redeemed (nonce, expiry in Unix seconds)\n";
/// A nonce is 16 random bytes, base64url: 22 characters. Anything longer
/// in the file is damage, not a nonce.
const MAX_NONCE_LEN: usize = 64;

/// The redeemed tokens of one CA directory.
#[derive(Debug)]
pub(crate) struct UsedTokens {
    path: PathBuf,
    /// nonce → expiry (Unix seconds).
    entries: HashMap<String, u64>,
}

impl UsedTokens {
    /// Read `dir/used-tokens` (absent means none used yet), dropping
    /// entries expired at `now_unix`.
    pub(crate) fn load(dir: &Path, now_unix: u64) -> Result<Self, CaError> {
        let path = dir.join(USED_TOKENS_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(CaError::io("read", &path, e)),
        };
        let entries = parse(&text).map_err(|reason| CaError::corrupt(&path, reason))?;
        let mut used = UsedTokens { path, entries };
        used.prune(now_unix);
        Ok(used)
    }

    pub(crate) fn contains(&self, nonce: &str) -> bool {
        self.entries.contains_key(nonce)
    }

    /// Record `nonce` (expiring at `exp`) as redeemed and write the file
    /// before returning: the caller issues only after this succeeded, so a
    /// crash cannot leave a token issued but not recorded.
    pub(crate) fn redeem(&mut self, nonce: &str, exp: u64, now_unix: u64) -> Result<(), CaError> {
        if self.contains(nonce) {
            return Err(CaError::TokenAlreadyUsed);
        }
        self.prune(now_unix);
        let mut next = self.entries.clone();
        next.insert(nonce.to_string(), exp);
        files::write_replace(&self.path, render(&next).as_bytes(), true)?;
        self.entries = next;
        Ok(())
    }

    fn prune(&mut self, now_unix: u64) {
        self.entries.retain(|_, exp| *exp > now_unix);
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Parse the file body. Pure, so damage is testable.
fn parse(text: &str) -> Result<HashMap<String, u64>, String> {
    let mut entries = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_ascii_whitespace();
        let (Some(nonce), Some(exp), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err(format!("line {}: expected `<nonce> <expiry>`", n + 1));
        };
        if nonce.len() > MAX_NONCE_LEN {
            return Err(format!("line {}: the nonce is too long", n + 1));
        }
        let exp = exp
            .parse::<u64>()
            .map_err(|_| format!("line {}: the expiry is not a number", n + 1))?;
        entries.insert(nonce.to_string(), exp);
    }
    Ok(entries)
}

fn render(entries: &HashMap<String, u64>) -> String {
    let mut lines: Vec<_> = entries.iter().collect();
    lines.sort();
    let mut out = String::from(HEADER);
    for (nonce, exp) in lines {
        out.push_str(&format!("{nonce} {exp}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redeemed_tokens_survive_a_reload_until_they_expire() {
        let tmp = tempfile::tempdir().unwrap();
        let mut used = UsedTokens::load(tmp.path(), 1000).unwrap();
        assert!(!used.contains("a"));
        used.redeem("a", 2000, 1000).unwrap();
        used.redeem("b", 1500, 1000).unwrap();
        assert!(matches!(
            used.redeem("a", 2000, 1001),
            Err(CaError::TokenAlreadyUsed)
        ));

        let reloaded = UsedTokens::load(tmp.path(), 1200).unwrap();
        assert!(reloaded.contains("a") && reloaded.contains("b"));
        // b's token expired at 1500: it is dropped on load and on write.
        let mut later = UsedTokens::load(tmp.path(), 1600).unwrap();
        assert!(later.contains("a") && !later.contains("b"));
        later.redeem("c", 3000, 1600).unwrap();
        let text = std::fs::read_to_string(tmp.path().join(USED_TOKENS_FILE)).unwrap();
        assert!(!text.contains("b 1500"), "{text}");
        assert_eq!(later.len(), 2);

        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(tmp.path().join(USED_TOKENS_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_damaged_file_is_refused_not_ignored() {
        // Ignoring damage would make redeemed tokens usable again.
        for bad in ["abc", "abc x", "abc 1 2", &format!("{} 1", "n".repeat(100))] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(parse("# comment\n\nabc 12\n").unwrap()["abc"], 12);
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(USED_TOKENS_FILE), "abc x\n").unwrap();
        let err = UsedTokens::load(tmp.path(), 0).unwrap_err();
        assert!(err.to_string().contains("used-tokens"), "{err}");
    }
}
