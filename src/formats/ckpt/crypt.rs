//! MindSpore's checkpoint encryption (`enc_key`/`enc_mode`), from
//! `mindspore/core/utils/crypto.cc` and verified against MindSpore 2.10.
//!
//! A file is a sequence of blocks, each encrypting at most 64 MiB of the
//! plaintext record stream. All integers are little-endian i32/u32:
//!
//! ```text
//! magic u32 | [tag 16 B, GCM only] | L i32 | iv_len i32 (16) | iv 16 B | cipher_len i32 | ciphertext
//! ```
//!
//! `L` counts the bytes after itself. The key is used directly (no KDF).
//! GCM: no AAD, 16-byte tag, and MindSpore 2.10 uses the first 12 bytes of
//! the stored 16-byte IV as the nonce (older builds used all 16; we try both
//! when reading). CBC modes use PKCS#7 padding.

use std::fmt;
use std::str::FromStr;

use aes_gcm::aead::consts::{U12, U16};
use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::AesGcm;
use cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit};

use crate::error::{Error, Result};

/// Plaintext bytes per encrypted block (`ENCRYPT_BLOCK_SIZE` = 64 MiB).
pub const ENCRYPT_BLOCK_SIZE: usize = 64 * 1024 * 1024;

const MAGIC_GCM: u32 = 0x7F3A_5ED8;
const MAGIC_CBC: u32 = 0x7F3A_5ED9;
const MAGIC_SM4_CBC: u32 = 0x7F3A_5EDA;
const IV_LEN: usize = 16;
const TAG_LEN: usize = 16;

/// Cipher mode of an encrypted checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncMode {
    /// AES-128/192/256 in GCM mode (MindSpore's default).
    AesGcm,
    /// AES-128/192/256 in CBC mode with PKCS#7 padding.
    AesCbc,
    /// SM4 in CBC mode with PKCS#7 padding (16-byte key).
    Sm4Cbc,
}

impl EncMode {
    fn magic(self) -> u32 {
        match self {
            EncMode::AesGcm => MAGIC_GCM,
            EncMode::AesCbc => MAGIC_CBC,
            EncMode::Sm4Cbc => MAGIC_SM4_CBC,
        }
    }

    /// MindSpore's spelling (`AES-GCM`, `AES-CBC`, `SM4-CBC`).
    pub fn name(self) -> &'static str {
        match self {
            EncMode::AesGcm => "AES-GCM",
            EncMode::AesCbc => "AES-CBC",
            EncMode::Sm4Cbc => "SM4-CBC",
        }
    }

    /// Checks that `key` has a length this mode accepts.
    pub fn check_key(self, key: &[u8]) -> Result<()> {
        let ok = match self {
            EncMode::AesGcm | EncMode::AesCbc => matches!(key.len(), 16 | 24 | 32),
            EncMode::Sm4Cbc => key.len() == 16,
        };
        if ok {
            Ok(())
        } else {
            Err(Error::usage(format!(
                "a {} key must be {} bytes, got {}",
                self.name(),
                if self == EncMode::Sm4Cbc {
                    "16"
                } else {
                    "16, 24 or 32"
                },
                key.len()
            )))
        }
    }
}

impl fmt::Display for EncMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for EncMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<EncMode> {
        match s.to_ascii_uppercase().as_str() {
            "AES-GCM" => Ok(EncMode::AesGcm),
            "AES-CBC" => Ok(EncMode::AesCbc),
            "SM4-CBC" => Ok(EncMode::Sm4Cbc),
            _ => Err(Error::usage(format!(
                "unknown encryption mode {s:?} (expected AES-GCM, AES-CBC or SM4-CBC)"
            ))),
        }
    }
}

/// The mode of an encrypted file, from its first four bytes (`IsCipherFile`).
pub fn detect(buf: &[u8]) -> Option<EncMode> {
    let magic = u32::from_le_bytes(buf.get(..4)?.try_into().ok()?);
    [EncMode::AesGcm, EncMode::AesCbc, EncMode::Sm4Cbc]
        .into_iter()
        .find(|m| m.magic() == magic)
}

/// Decrypts a whole file into its plaintext record stream.
pub fn decrypt(buf: &[u8], key: &[u8], mode: EncMode) -> Result<Vec<u8>> {
    mode.check_key(key)?;
    let mut out = Vec::with_capacity(buf.len());
    let mut pos = 0usize;
    let mut block = 0usize;
    while pos < buf.len() {
        let start = pos;
        let fail = |reason: String| Error::Decrypt {
            block,
            offset: start as u64,
            reason,
        };
        let mut take = |n: usize, what: &str| -> Result<&[u8]> {
            let s = buf.get(pos..pos + n).ok_or_else(|| {
                fail(format!(
                    "truncated: {what} needs {n} bytes, {} remain",
                    buf.len() - pos
                ))
            })?;
            pos += n;
            Ok(s)
        };
        let magic = u32::from_le_bytes(take(4, "magic")?.try_into().unwrap());
        if magic != mode.magic() {
            let found = detect(&magic.to_le_bytes());
            return Err(fail(match found {
                Some(m) => format!("block is {m}, not {mode}: decrypt it with mode {m}"),
                None => format!("bad block magic {magic:#010x}; the file is damaged"),
            }));
        }
        let tag = if mode == EncMode::AesGcm {
            Some(take(TAG_LEN, "GCM tag")?.to_vec())
        } else {
            None
        };
        let total = i32::from_le_bytes(take(4, "block length")?.try_into().unwrap());
        let iv_len = i32::from_le_bytes(take(4, "IV length")?.try_into().unwrap());
        if iv_len != IV_LEN as i32 {
            return Err(fail(format!("IV length {iv_len}, expected 16")));
        }
        let iv = take(IV_LEN, "IV")?.to_vec();
        let cipher_len = i32::from_le_bytes(take(4, "cipher length")?.try_into().unwrap());
        if cipher_len < 0 || total != (4 + IV_LEN + 4) as i32 + cipher_len {
            return Err(fail(format!(
                "inconsistent lengths (block {total}, cipher {cipher_len})"
            )));
        }
        let cipher = take(cipher_len as usize, "ciphertext")?;
        let plain = match mode {
            EncMode::AesGcm => gcm_decrypt(key, &iv, tag.as_deref().unwrap(), cipher),
            EncMode::AesCbc => cbc_decrypt_aes(key, &iv, cipher),
            EncMode::Sm4Cbc => cbc::Decryptor::<sm4::Sm4>::new_from_slices(key, &iv)
                .map_err(|e| e.to_string())
                .and_then(|d| {
                    d.decrypt_padded_vec_mut::<cipher::block_padding::Pkcs7>(cipher)
                        .map_err(|e| e.to_string())
                }),
        }
        .map_err(|reason| {
            fail(format!(
                "{reason} (wrong key, wrong mode, or a tampered block)"
            ))
        })?;
        out.extend_from_slice(&plain);
        block += 1;
    }
    Ok(out)
}

/// Encrypts one plaintext block (≤ 64 MiB) into MindSpore's block framing.
pub fn encrypt_block(plain: &[u8], key: &[u8], mode: EncMode, iv: &[u8; 16]) -> Result<Vec<u8>> {
    mode.check_key(key)?;
    let (tag, cipher) = match mode {
        EncMode::AesGcm => {
            let mut buf = plain.to_vec();
            let tag = gcm_encrypt(key, &iv[..12], &mut buf)?;
            (Some(tag), buf)
        }
        EncMode::AesCbc => (None, cbc_encrypt_aes(key, iv, plain)?),
        EncMode::Sm4Cbc => (
            None,
            cbc::Encryptor::<sm4::Sm4>::new_from_slices(key, iv)
                .map_err(|e| Error::Internal(e.to_string()))?
                .encrypt_padded_vec_mut::<cipher::block_padding::Pkcs7>(plain),
        ),
    };
    let cipher_len = i32::try_from(cipher.len()).map_err(|_| Error::LimitExceeded {
        what: "an encrypted block's size in bytes",
        limit: i32::MAX as u64,
        got: cipher.len() as u64,
    })?;
    let mut out = Vec::with_capacity(cipher.len() + 64);
    out.extend_from_slice(&mode.magic().to_le_bytes());
    if let Some(tag) = tag {
        out.extend_from_slice(&tag);
    }
    out.extend_from_slice(&((4 + IV_LEN + 4) as i32 + cipher_len).to_le_bytes());
    out.extend_from_slice(&(IV_LEN as i32).to_le_bytes());
    out.extend_from_slice(iv);
    out.extend_from_slice(&cipher_len.to_le_bytes());
    out.extend_from_slice(&cipher);
    Ok(out)
}

macro_rules! by_aes_key {
    ($key:expr, $k:ident => $body:expr) => {
        match $key.len() {
            16 => {
                type $k = aes::Aes128;
                $body
            }
            24 => {
                type $k = aes::Aes192;
                $body
            }
            _ => {
                type $k = aes::Aes256;
                $body
            }
        }
    };
}

fn gcm_decrypt(
    key: &[u8],
    iv: &[u8],
    tag: &[u8],
    cipher: &[u8],
) -> std::result::Result<Vec<u8>, String> {
    // MindSpore 2.10: 12-byte nonce (first 12 IV bytes); older: 16-byte IV.
    let try_nonce = |n: usize| -> Option<Vec<u8>> {
        let mut buf = cipher.to_vec();
        let ok = by_aes_key!(key, K => if n == 12 {
            AesGcm::<K, U12>::new_from_slice(key).ok()?
                .decrypt_in_place_detached(iv[..12].into(), b"", &mut buf, tag.into()).is_ok()
        } else {
            AesGcm::<K, U16>::new_from_slice(key).ok()?
                .decrypt_in_place_detached(iv.into(), b"", &mut buf, tag.into()).is_ok()
        });
        ok.then_some(buf)
    };
    try_nonce(12)
        .or_else(|| try_nonce(16))
        .ok_or_else(|| "GCM authentication failed".to_string())
}

fn gcm_encrypt(key: &[u8], nonce: &[u8], buf: &mut [u8]) -> Result<[u8; 16]> {
    let tag = by_aes_key!(key, K => AesGcm::<K, U12>::new_from_slice(key)
        .map_err(|e| Error::Internal(e.to_string()))?
        .encrypt_in_place_detached(nonce.into(), b"", buf)
        .map_err(|e| Error::Internal(e.to_string()))?);
    Ok(tag.into())
}

fn cbc_decrypt_aes(key: &[u8], iv: &[u8], cipher: &[u8]) -> std::result::Result<Vec<u8>, String> {
    by_aes_key!(key, K => cbc::Decryptor::<K>::new_from_slices(key, iv)
        .map_err(|e| e.to_string())?
        .decrypt_padded_vec_mut::<cipher::block_padding::Pkcs7>(cipher)
        .map_err(|_| "bad CBC padding".to_string()))
}

fn cbc_encrypt_aes(key: &[u8], iv: &[u8], plain: &[u8]) -> Result<Vec<u8>> {
    Ok(
        by_aes_key!(key, K => cbc::Encryptor::<K>::new_from_slices(key, iv)
        .map_err(|e| Error::Internal(e.to_string()))?
        .encrypt_padded_vec_mut::<cipher::block_padding::Pkcs7>(plain)),
    )
}

/// Parses a key given on the command line: `hex:<digits>` for bytes in
/// hex, otherwise the UTF-8 bytes of the text itself (MindSpore's `enc_key`
/// is usually a text key such as `b"0123456789abcdef"`). Hex is never
/// guessed: a text key made of hex digits must stay text.
pub fn parse_key(text: &str) -> Result<Vec<u8>> {
    let Some(hex) = text.strip_prefix("hex:") else {
        return Ok(text.as_bytes().to_vec());
    };
    if hex.is_empty() || hex.len() % 2 != 0 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::usage(
            "key after 'hex:' is not an even number of hex digits",
        ));
    }
    Ok((0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("checked hex digits"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN: &[u8] = b"\x0a\x05hello world, this is a checkpoint stream";

    #[test]
    fn every_mode_round_trips() {
        let iv = [7u8; 16];
        for (mode, key) in [
            (EncMode::AesGcm, vec![1u8; 16]),
            (EncMode::AesGcm, vec![2u8; 32]),
            (EncMode::AesCbc, vec![3u8; 24]),
            (EncMode::Sm4Cbc, vec![4u8; 16]),
        ] {
            let mut file = encrypt_block(PLAIN, &key, mode, &iv).unwrap();
            file.extend(encrypt_block(b"second block", &key, mode, &iv).unwrap());
            assert_eq!(detect(&file), Some(mode));
            let plain = decrypt(&file, &key, mode).unwrap();
            assert_eq!(plain, [PLAIN, b"second block"].concat(), "{mode}");
        }
    }

    #[test]
    fn wrong_key_is_a_decrypt_error() {
        for mode in [EncMode::AesGcm, EncMode::AesCbc, EncMode::Sm4Cbc] {
            let file = encrypt_block(PLAIN, &[1u8; 16], mode, &[9u8; 16]).unwrap();
            match decrypt(&file, &[2u8; 16], mode) {
                Err(Error::Decrypt { block: 0, .. }) => {}
                // CBC with a wrong key can by chance produce valid padding;
                // then the plaintext is garbage, never the original.
                Ok(p) => assert_ne!(p, PLAIN, "{mode}"),
                Err(e) => panic!("{mode}: {e}"),
            }
        }
    }

    #[test]
    fn tampered_gcm_block_is_rejected() {
        let mut file = encrypt_block(PLAIN, &[1u8; 16], EncMode::AesGcm, &[9u8; 16]).unwrap();
        let last = file.len() - 1;
        file[last] ^= 1;
        let err = decrypt(&file, &[1u8; 16], EncMode::AesGcm).unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Encrypted, "{err}");
        assert!(err.to_string().contains("tampered"), "{err}");
    }

    /// Issue 19 item 11: what each mode can detect. GCM authenticates every
    /// byte; CBC has no MAC: only the padding of each block's last 16 bytes
    /// is checked here, a change elsewhere decrypts to different plaintext
    /// (garbling one 16-byte block and flipping the same bit of the next),
    /// which only the record structure can catch (see README, Trust).
    #[test]
    fn what_each_mode_detects() {
        let plain: Vec<u8> = (0..200u8).collect();
        let key = [7u8; 16];
        let gcm = encrypt_block(&plain, &key, EncMode::AesGcm, &[9u8; 16]).unwrap();
        for at in [4, 20, 30, gcm.len() / 2, gcm.len() - 1] {
            let mut f = gcm.clone();
            f[at] ^= 0x10;
            assert!(decrypt(&f, &key, EncMode::AesGcm).is_err(), "GCM byte {at}");
        }
        // The IV field's last 4 bytes are not part of MindSpore 2.10's
        // 12-byte nonce: changing them changes nothing that is read.
        let mut f = gcm.clone();
        f[4 + 16 + 4 + 4 + 13] ^= 0x10;
        assert_eq!(decrypt(&f, &key, EncMode::AesGcm).unwrap(), plain);
        for mode in [EncMode::AesCbc, EncMode::Sm4Cbc] {
            let file = encrypt_block(&plain, &key, mode, &[9u8; 16]).unwrap();
            // The last block holds the padding: a change there is caught
            // (unless it happens to leave valid padding: 1 in ~256).
            let mut f = file.clone();
            let last = f.len() - 1;
            f[last] ^= 0x10;
            assert!(decrypt(&f, &key, mode).is_err(), "{mode}: padding");
            // A change in an earlier block is not: the plaintext differs.
            let mut f = file.clone();
            let early = f.len() - 100;
            f[early] ^= 0x10;
            let got = decrypt(&f, &key, mode).unwrap();
            assert_eq!(got.len(), plain.len());
            assert_ne!(got, plain, "{mode}");
        }
    }

    #[test]
    fn truncated_block_and_wrong_mode_are_errors() {
        let file = encrypt_block(PLAIN, &[1u8; 16], EncMode::AesCbc, &[9u8; 16]).unwrap();
        let err = decrypt(&file[..file.len() - 3], &[1u8; 16], EncMode::AesCbc).unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Encrypted, "{err}");
        assert!(err.to_string().contains("truncated"), "{err}");
        let err = decrypt(&file, &[1u8; 16], EncMode::AesGcm).unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::Encrypted, "{err}");
        assert!(err.to_string().contains("with mode AES-CBC"), "{err}");
    }

    #[test]
    fn key_lengths_are_checked() {
        assert!(EncMode::Sm4Cbc.check_key(&[0; 32]).is_err());
        assert!(EncMode::AesGcm.check_key(&[0; 20]).is_err());
        assert!(EncMode::AesGcm.check_key(&[0; 24]).is_ok());
    }

    #[test]
    fn keys_parse_from_hex_or_text() {
        assert_eq!(parse_key("hex:0aff").unwrap(), vec![0x0a, 0xff]);
        assert_eq!(
            parse_key("0123456789abcdef").unwrap(),
            b"0123456789abcdef".to_vec()
        );
        assert_eq!(
            parse_key(&"ab".repeat(16)).unwrap(),
            "ab".repeat(16).into_bytes()
        );
        assert_eq!(
            parse_key(&format!("hex:{}", "ab".repeat(16))).unwrap(),
            vec![0xab; 16]
        );
        assert!(parse_key("hex:xyz").is_err());
    }
}
