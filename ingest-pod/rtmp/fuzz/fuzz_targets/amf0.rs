//! AMF0 decoding of arbitrary bytes; what decodes must re-encode and decode the same.
#![no_main]

use ingest_rtmp::amf0;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(values) = amf0::decode_all(data) {
        let again = amf0::encode_all(&values);
        let decoded = amf0::decode_all(&again).expect("our own encoding decodes");
        // NaN != NaN: compare encodings instead of values.
        assert_eq!(amf0::encode_all(&decoded), again);
    }
});
