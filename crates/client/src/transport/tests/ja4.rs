//! The ClientHello our TLS connector sends, fingerprinted with JA4 (FoxIO's algorithm,
//! implemented here from its specification) and compared with the value measured when this
//! test was written, so any change of fingerprint is noticed and can be recorded in
//! ARCHITECTURE.md beside a mainstream browser's.

use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

use crate::transport::endpoint::Host;
use crate::transport::tls::{self, Role, Trust};

/// Our fingerprint as measured (rustls 0.23, ring provider, TLS 1.2 and 1.3, ALPN http/1.1).
const MEASURED_JA4: &str = "t13d1011h1_61a7ad8aa9b6_3fcd1a44f3e3";

/// Whether `v` is a GREASE value (RFC 8701): both bytes equal, low nibble 0xa.
fn grease(v: u16) -> bool {
    (v >> 8) == (v & 0xff) && (v & 0x0f) == 0x0a
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

fn hash12(text: &str) -> String {
    if text.is_empty() {
        return "000000000000".into();
    }
    hex::encode(Sha256::digest(text.as_bytes()))[..12].to_string()
}

fn hex_list(values: &[u16]) -> String {
    values
        .iter()
        .map(|v| format!("{v:04x}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// JA4 of a ClientHello handshake message body (after the 4-byte handshake header).
fn ja4(hello: &[u8]) -> String {
    let mut i = 2 + 32; // legacy_version, random
    i += 1 + hello[i] as usize; // session id
    let cipher_len = u16_at(hello, i) as usize;
    let ciphers: Vec<u16> = (0..cipher_len / 2)
        .map(|k| u16_at(hello, i + 2 + 2 * k))
        .filter(|&c| !grease(c))
        .collect();
    i += 2 + cipher_len;
    i += 1 + hello[i] as usize; // compression methods
    let ext_end = i + 2 + u16_at(hello, i) as usize;
    i += 2;
    let (mut exts, mut sni, mut alpn, mut sigalgs, mut version) =
        (Vec::new(), false, String::from("00"), Vec::new(), 0u16);
    while i + 4 <= ext_end {
        let (ty, len) = (u16_at(hello, i), u16_at(hello, i + 2) as usize);
        let data = &hello[i + 4..i + 4 + len];
        i += 4 + len;
        if grease(ty) {
            continue;
        }
        exts.push(ty);
        match ty {
            0x0000 => sni = true,
            0x0010 => {
                // protocol_name_list: u16 length, then u8-length-prefixed names.
                let first = &data[3..3 + data[2] as usize];
                let name = String::from_utf8_lossy(first);
                let (a, z) = (name.chars().next().unwrap(), name.chars().last().unwrap());
                alpn = format!("{a}{z}");
            }
            0x000d => {
                let n = u16_at(data, 0) as usize / 2;
                sigalgs = (0..n).map(|k| u16_at(data, 2 + 2 * k)).collect();
            }
            0x002b => {
                let n = data[0] as usize / 2;
                version = (0..n)
                    .map(|k| u16_at(data, 1 + 2 * k))
                    .filter(|&v| !grease(v))
                    .max()
                    .unwrap_or(0);
            }
            _ => {}
        }
    }
    if version == 0 {
        version = u16_at(hello, 0);
    }
    let version = match version {
        0x0304 => "13",
        0x0303 => "12",
        0x0302 => "11",
        0x0301 => "10",
        _ => "00",
    };
    let a = format!(
        "t{version}{}{:02}{:02}{alpn}",
        if sni { 'd' } else { 'i' },
        ciphers.len().min(99),
        exts.len().min(99)
    );
    let mut sorted_ciphers = ciphers.clone();
    sorted_ciphers.sort_unstable();
    let mut sorted_exts: Vec<u16> = exts
        .iter()
        .copied()
        .filter(|&e| e != 0x0000 && e != 0x0010)
        .collect();
    sorted_exts.sort_unstable();
    let c_input = if sigalgs.is_empty() {
        hex_list(&sorted_exts)
    } else {
        format!("{}_{}", hex_list(&sorted_exts), hex_list(&sigalgs))
    };
    // The raw form (JA4_r), for comparing by eye with a browser's.
    eprintln!("JA4_r: {a}_{}_{c_input}", hex_list(&sorted_ciphers));
    format!(
        "{a}_{}_{}",
        hash12(&hex_list(&sorted_ciphers)),
        hash12(&c_input)
    )
}

#[test]
fn the_ja4_implementation_matches_the_specifications_example_shape() {
    // Chrome's JA4_r from a public capture: ciphers and extensions as hashed.
    let ciphers = "002f,0035,009c,009d,1301,1302,1303,c013,c014,c02b,c02c,c02f,c030,cca8,cca9";
    assert_eq!(hash12(ciphers), "8daaf6152771");
    assert!(grease(0x0a0a) && grease(0xfafa) && !grease(0x1301));
}

#[tokio::test]
async fn our_client_hello_has_the_measured_ja4() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let client = tokio::spawn(async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let trust = Trust {
            role: Role::Server,
            pins: &[],
            extra_roots: &[],
            send_sni: true,
        };
        // The listener never answers; the handshake fails once it hangs up.
        let _ = tls::handshake(Box::new(tcp), &Host::Name("example.org".into()), &trust).await;
    });
    let (mut tcp, _) = listener.accept().await.unwrap();
    let mut header = [0u8; 5];
    tcp.read_exact(&mut header).await.unwrap();
    assert_eq!(header[0], 0x16, "a handshake record");
    let mut record = vec![0u8; u16::from_be_bytes([header[3], header[4]]) as usize];
    tcp.read_exact(&mut record).await.unwrap();
    assert_eq!(record[0], 0x01, "a ClientHello");
    let len = u32::from_be_bytes([0, record[1], record[2], record[3]]) as usize;
    assert!(4 + len <= record.len(), "the ClientHello fits one record");
    let fingerprint = ja4(&record[4..4 + len]);
    eprintln!("our ClientHello's JA4: {fingerprint}");
    drop(tcp);
    let _ = client.await;
    assert_eq!(
        fingerprint, MEASURED_JA4,
        "the ClientHello changed: record the new JA4"
    );
}
