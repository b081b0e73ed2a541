//! The handshake on arbitrary C0/C1 and S0/S1/S2.
#![no_main]

use ingest_rtmp::handshake;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = handshake::server_response(data, 0, 1);
    let _ = handshake::client_ack(data);
    let _ = handshake::check_c2(data);
});
