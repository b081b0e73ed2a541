//! The RTMP handshake (C0/C1/C2, S0/S1/S2), without I/O.
//!
//! The server answers with a plain version-3 S1/S2 whatever C1 carries. The
//! digest variant that ffmpeg, OBS and GStreamer send is accepted that way:
//! publishers do not verify the server's digest, and nginx-rtmp relies on the
//! same fact.

use thiserror::Error;

/// Protocol version of plain (unencrypted) RTMP.
pub const RTMP_VERSION: u8 = 3;
/// Size of C1, C2, S1 and S2.
pub const HANDSHAKE_SIZE: usize = 1536;
/// Size of C0 + C1 (what the server reads first).
pub const C0C1_SIZE: usize = 1 + HANDSHAKE_SIZE;
/// Size of S0 + S1 + S2 (what the client reads).
pub const S0S1S2_SIZE: usize = 1 + 2 * HANDSHAKE_SIZE;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    #[error("handshake version {0} is not plain RTMP (3); RTMPE and other versions are not supported")]
    UnsupportedVersion(u8),
    #[error("handshake message has {got} bytes, expected {expected}")]
    BadLength { got: usize, expected: usize },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Fills `out` with non-cryptographic filler bytes from `seed` (the random
/// part of S1/C1 only has to differ between peers).
fn fill(out: &mut [u8], mut seed: u64) {
    for b in out.iter_mut() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        *b = seed as u8;
    }
}

/// Builds S0 + S1 + S2 in answer to the client's C0 + C1.
///
/// S2 echoes C1 (its time, the time we read it, and its random bytes).
pub fn server_response(c0c1: &[u8], server_time: u32, seed: u64) -> Result<Vec<u8>> {
    if c0c1.len() != C0C1_SIZE {
        return Err(Error::BadLength {
            got: c0c1.len(),
            expected: C0C1_SIZE,
        });
    }
    if c0c1[0] != RTMP_VERSION {
        return Err(Error::UnsupportedVersion(c0c1[0]));
    }
    let c1 = &c0c1[1..];
    let mut out = vec![0u8; S0S1S2_SIZE];
    out[0] = RTMP_VERSION;
    let s1 = &mut out[1..1 + HANDSHAKE_SIZE];
    s1[0..4].copy_from_slice(&server_time.to_be_bytes());
    // Bytes 4..8 stay zero: a zero "version" tells clients that S1 carries no digest.
    fill(&mut s1[8..], seed | 1);
    let s2 = &mut out[1 + HANDSHAKE_SIZE..];
    s2.copy_from_slice(c1);
    s2[4..8].copy_from_slice(&server_time.to_be_bytes());
    Ok(out)
}

/// Builds the client's C0 + C1.
pub fn client_hello(client_time: u32, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; C0C1_SIZE];
    out[0] = RTMP_VERSION;
    out[1..5].copy_from_slice(&client_time.to_be_bytes());
    fill(&mut out[9..], seed | 1);
    out
}

/// Checks the server's S0 + S1 + S2 and builds C2 (an echo of S1).
pub fn client_ack(s0s1s2: &[u8]) -> Result<Vec<u8>> {
    if s0s1s2.len() != S0S1S2_SIZE {
        return Err(Error::BadLength {
            got: s0s1s2.len(),
            expected: S0S1S2_SIZE,
        });
    }
    if s0s1s2[0] != RTMP_VERSION {
        return Err(Error::UnsupportedVersion(s0s1s2[0]));
    }
    Ok(s0s1s2[1..1 + HANDSHAKE_SIZE].to_vec())
}

/// Checks C2's length. Its content is not verified: real publishers differ
/// in what they echo, and nothing depends on it.
pub fn check_c2(c2: &[u8]) -> Result<()> {
    if c2.len() != HANDSHAKE_SIZE {
        return Err(Error::BadLength {
            got: c2.len(),
            expected: HANDSHAKE_SIZE,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_echoes_c1_in_s2() {
        let c0c1 = client_hello(1234, 42);
        let resp = server_response(&c0c1, 99, 7).unwrap();
        assert_eq!(resp.len(), S0S1S2_SIZE);
        assert_eq!(resp[0], RTMP_VERSION);
        let s2 = &resp[1 + HANDSHAKE_SIZE..];
        assert_eq!(&s2[0..4], &1234u32.to_be_bytes());
        assert_eq!(&s2[4..8], &99u32.to_be_bytes());
        assert_eq!(&s2[8..], &c0c1[9..]);
        // S1 announces no digest.
        assert_eq!(&resp[5..9], &[0, 0, 0, 0]);
    }

    #[test]
    fn digest_c1_from_ffmpeg_is_answered_plainly() {
        // ffmpeg puts its version (9.0.124.2) in bytes 4..8 of C1 and a digest in the rest.
        let mut c0c1 = client_hello(0, 3);
        c0c1[5..9].copy_from_slice(&[9, 0, 124, 2]);
        let resp = server_response(&c0c1, 1, 1).unwrap();
        assert_eq!(&resp[5..9], &[0, 0, 0, 0]);
    }

    #[test]
    fn rejects_other_versions_and_lengths() {
        let mut c0c1 = client_hello(0, 3);
        c0c1[0] = 6;
        assert_eq!(server_response(&c0c1, 0, 0), Err(Error::UnsupportedVersion(6)));
        assert!(matches!(
            server_response(&c0c1[..10], 0, 0),
            Err(Error::BadLength { .. })
        ));
        assert!(check_c2(&[0; 10]).is_err());
    }

    #[test]
    fn client_round_trip() {
        let hello = client_hello(5, 5);
        let resp = server_response(&hello, 6, 6).unwrap();
        let c2 = client_ack(&resp).unwrap();
        assert_eq!(c2, resp[1..1 + HANDSHAKE_SIZE].to_vec());
        check_c2(&c2).unwrap();
    }
}
