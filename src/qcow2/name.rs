// SPDX-License-Identifier: GPL-2.0-or-later

//! Bitmap names: bytes, as qcow2 stores them.
//!
//! QEMU writes any bytes it is given (TAB, newline, bytes that are not UTF-8) and reads any it
//! finds (a NUL too: QEMU then uses the name up to it, and a 0-byte name), so a name is a byte
//! string, shown to people in an escaped form that is printable and unambiguous.
#![forbid(unsafe_code)]

use std::fmt;

/// The name of a persistent bitmap: the bytes stored in the directory.
///
/// `Display` gives the escaped form ([`BitmapName::escaped`]); [`BitmapName::parse_escaped`]
/// reads it back. Compares equal to a `str` of the same bytes.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct BitmapName(Vec<u8>);

impl BitmapName {
    /// The stored bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The name as text, when it is UTF-8 (control characters and NULs included).
    pub fn to_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }

    /// The name as QEMU shows and uses it: up to the first NUL byte, if any.
    pub fn qemu_name(&self) -> &[u8] {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(self.0.len());
        &self.0[..end]
    }

    /// The printable form: UTF-8 text as it is, except a backslash, shown as `\\`, and control
    /// characters, shown as `\t`, `\n`, `\r`, `\0` or `\xHH` per byte; a byte that is not part of
    /// valid UTF-8 is shown as `\xHH`. Two different names never have the same escaped form.
    pub fn escaped(&self) -> String {
        escape(&self.0)
    }

    /// Reads the form [`escaped`](Self::escaped) prints (any other character stands for
    /// itself); an unknown escape or a `\x` without two hex digits is an error.
    pub fn parse_escaped(text: &str) -> Result<BitmapName, String> {
        let mut out = Vec::with_capacity(text.len());
        let mut chars = text.char_indices();
        while let Some((at, c)) = chars.next() {
            if c != '\\' {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                continue;
            }
            let byte = match chars.next().map(|(_, c)| c) {
                Some('\\') => b'\\',
                Some('t') => b'\t',
                Some('n') => b'\n',
                Some('r') => b'\r',
                Some('0') => 0,
                Some('x') => {
                    let hex: String = chars.by_ref().take(2).map(|(_, c)| c).collect();
                    if hex.len() != 2 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                        return Err(format!(
                            "'\\x' at byte {at} of '{text}' needs two hex digits (\\xHH)"
                        ));
                    }
                    u8::from_str_radix(&hex, 16).expect("two hex digits")
                }
                Some(other) => {
                    return Err(format!(
                        "unknown escape '\\{other}' at byte {at} of '{text}' (known: \\\\ \\t \
                         \\n \\r \\0 \\xHH)"
                    ))
                }
                None => {
                    return Err(format!(
                        "'{text}' ends with a lone backslash (write \\\\ for a backslash)"
                    ))
                }
            };
            out.push(byte);
        }
        Ok(BitmapName(out))
    }

    /// The bytes, consumed.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

/// See [`BitmapName::escaped`].
pub(crate) fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\t' => out.push_str("\\t"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\0' => out.push_str("\\0"),
                c if c.is_control() => {
                    let mut buf = [0u8; 4];
                    for byte in c.encode_utf8(&mut buf).bytes() {
                        out.push_str(&format!("\\x{byte:02x}"));
                    }
                }
                c => out.push(c),
            }
        }
        for byte in chunk.invalid() {
            out.push_str(&format!("\\x{byte:02x}"));
        }
    }
    out
}

impl fmt::Display for BitmapName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.escaped())
    }
}

impl fmt::Debug for BitmapName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.escaped())
    }
}

impl AsRef<[u8]> for BitmapName {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl From<&str> for BitmapName {
    fn from(name: &str) -> BitmapName {
        BitmapName(name.as_bytes().to_vec())
    }
}

impl From<String> for BitmapName {
    fn from(name: String) -> BitmapName {
        BitmapName(name.into_bytes())
    }
}

impl From<&[u8]> for BitmapName {
    fn from(name: &[u8]) -> BitmapName {
        BitmapName(name.to_vec())
    }
}

impl From<Vec<u8>> for BitmapName {
    fn from(name: Vec<u8>) -> BitmapName {
        BitmapName(name)
    }
}

impl PartialEq<str> for BitmapName {
    fn eq(&self, other: &str) -> bool {
        self.0 == other.as_bytes()
    }
}

impl PartialEq<&str> for BitmapName {
    fn eq(&self, other: &&str) -> bool {
        self.0 == other.as_bytes()
    }
}

impl PartialEq<[u8]> for BitmapName {
    fn eq(&self, other: &[u8]) -> bool {
        self.0 == other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_cannot_be_seen_and_reads_it_back() {
        let cases: &[(&[u8], &str)] = &[
            (b"backup-0", "backup-0"),
            (b"tab\there", "tab\\there"),
            (b"nl\nx\r", "nl\\nx\\r"),
            (b"a\0b", "a\\0b"),
            (b"", ""),
            (b"\xff\xfe\x80", "\\xff\\xfe\\x80"),
            (b"back\\slash", "back\\\\slash"),
            (b"lit\\x41", "lit\\\\x41"),
            (b"\x1b[0m\x7f", "\\x1b[0m\\x7f"),
            ("caf\u{e9} \u{85}".as_bytes(), "caf\u{e9} \\xc2\\x85"),
            (b"half \xe2\x82", "half \\xe2\\x82"),
        ];
        for &(bytes, shown) in cases {
            let name = BitmapName::from(bytes);
            assert_eq!(name.escaped(), shown, "{bytes:?}");
            assert_eq!(name.to_string(), shown);
            assert_eq!(BitmapName::parse_escaped(shown).unwrap(), name, "{shown}");
        }
    }

    #[test]
    fn every_byte_survives_escaping() {
        let all: Vec<u8> = (0..=255).collect();
        let name = BitmapName::from(all.clone());
        let shown = name.escaped();
        assert!(shown.chars().all(|c| !c.is_control()), "{shown}");
        assert_eq!(
            BitmapName::parse_escaped(&shown).unwrap().as_bytes(),
            &all[..]
        );
    }

    #[test]
    fn refuses_malformed_escapes() {
        for bad in ["a\\", "\\q", "\\x4", "\\xg0", "\\x"] {
            assert!(BitmapName::parse_escaped(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn qemu_sees_the_name_up_to_a_nul() {
        assert_eq!(BitmapName::from(&b"a\0b"[..]).qemu_name(), b"a");
        assert_eq!(BitmapName::from("ab").qemu_name(), b"ab");
        assert_eq!(BitmapName::from("ab"), "ab");
    }
}
