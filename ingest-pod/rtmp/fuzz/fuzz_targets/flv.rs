//! The FLV reader (used on origin recordings) on arbitrary files.
#![no_main]

use ingest_rtmp::flv;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = flv::read_tags(data);
});
