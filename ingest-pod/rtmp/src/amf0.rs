//! AMF0 values, the encoding of RTMP commands and metadata.

use bytes::{BufMut, BytesMut};
use thiserror::Error;

/// Deepest nesting of objects and arrays a peer may send.
pub const MAX_DEPTH: usize = 16;
/// Most properties or elements in one object or array.
pub const MAX_ITEMS: usize = 4096;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    #[error("AMF0 value ends early")]
    Truncated,
    #[error("AMF0 values nest deeper than {MAX_DEPTH}")]
    TooDeep,
    #[error("AMF0 container has more than {MAX_ITEMS} items")]
    TooManyItems,
    #[error("AMF0 type marker {0:#04x} is not supported")]
    UnsupportedMarker(u8),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An AMF0 value. Objects keep their property order.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Number(f64),
    Boolean(bool),
    String(String),
    Object(Vec<(String, Value)>),
    Null,
    Undefined,
    EcmaArray(Vec<(String, Value)>),
    StrictArray(Vec<Value>),
    /// Milliseconds since the epoch and a time zone offset (unused by peers).
    Date(f64, i16),
    LongString(String),
    XmlDocument(String),
    TypedObject(String, Vec<(String, Value)>),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) | Value::LongString(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_number(&self) -> Option<f64> {
        match self {
            Value::Number(n) => Some(*n),
            _ => None,
        }
    }

    /// Looks a property up in an object or ECMA array.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Object(props) | Value::EcmaArray(props) | Value::TypedObject(_, props) => {
                props.iter().find(|(k, _)| k == key).map(|(_, v)| v)
            }
            _ => None,
        }
    }

    /// Builds an object from `(key, value)` pairs.
    pub fn object<const N: usize>(props: [(&str, Value); N]) -> Value {
        Value::Object(props.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
    }

    pub fn string(s: impl Into<String>) -> Value {
        Value::String(s.into())
    }
}

const NUMBER: u8 = 0x00;
const BOOLEAN: u8 = 0x01;
const STRING: u8 = 0x02;
const OBJECT: u8 = 0x03;
const NULL: u8 = 0x05;
const UNDEFINED: u8 = 0x06;
const ECMA_ARRAY: u8 = 0x08;
const OBJECT_END: u8 = 0x09;
const STRICT_ARRAY: u8 = 0x0a;
const DATE: u8 = 0x0b;
const LONG_STRING: u8 = 0x0c;
const XML_DOCUMENT: u8 = 0x0f;
const TYPED_OBJECT: u8 = 0x10;

/// Decodes every value in `data`.
pub fn decode_all(mut data: &[u8]) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    while !data.is_empty() {
        if out.len() >= MAX_ITEMS {
            return Err(Error::TooManyItems);
        }
        out.push(decode(&mut data)?);
    }
    Ok(out)
}

/// Decodes one value from the front of `data`, advancing it.
pub fn decode(data: &mut &[u8]) -> Result<Value> {
    decode_at(data, 0)
}

fn take<'a>(data: &mut &'a [u8], n: usize) -> Result<&'a [u8]> {
    if data.len() < n {
        return Err(Error::Truncated);
    }
    let (head, tail) = data.split_at(n);
    *data = tail;
    Ok(head)
}

fn take_u16(data: &mut &[u8]) -> Result<u16> {
    let b = take(data, 2)?;
    Ok(u16::from_be_bytes([b[0], b[1]]))
}

fn take_u32(data: &mut &[u8]) -> Result<u32> {
    let b = take(data, 4)?;
    Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn take_f64(data: &mut &[u8]) -> Result<f64> {
    let b = take(data, 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Ok(f64::from_be_bytes(a))
}

/// Strings are taken lossily: a stray byte in an encoder's metadata must not
/// refuse the stream. The length is checked against the input before copying.
fn take_string(data: &mut &[u8], len: usize) -> Result<String> {
    Ok(String::from_utf8_lossy(take(data, len)?).into_owned())
}

fn short_string(data: &mut &[u8]) -> Result<String> {
    let len = take_u16(data)? as usize;
    take_string(data, len)
}

fn properties(data: &mut &[u8], depth: usize) -> Result<Vec<(String, Value)>> {
    let mut props = Vec::new();
    loop {
        let key = short_string(data)?;
        if key.is_empty() && data.first() == Some(&OBJECT_END) {
            *data = &data[1..];
            return Ok(props);
        }
        if props.len() >= MAX_ITEMS {
            return Err(Error::TooManyItems);
        }
        let value = decode_at(data, depth + 1)?;
        props.push((key, value));
    }
}

fn decode_at(data: &mut &[u8], depth: usize) -> Result<Value> {
    if depth > MAX_DEPTH {
        return Err(Error::TooDeep);
    }
    let marker = take(data, 1)?[0];
    Ok(match marker {
        NUMBER => Value::Number(take_f64(data)?),
        BOOLEAN => Value::Boolean(take(data, 1)?[0] != 0),
        STRING => Value::String(short_string(data)?),
        OBJECT => Value::Object(properties(data, depth)?),
        NULL => Value::Null,
        UNDEFINED => Value::Undefined,
        ECMA_ARRAY => {
            // The count is a hint that encoders get wrong; the end marker rules.
            take_u32(data)?;
            Value::EcmaArray(properties(data, depth)?)
        }
        STRICT_ARRAY => {
            let count = take_u32(data)? as usize;
            if count > MAX_ITEMS {
                return Err(Error::TooManyItems);
            }
            // Each element takes at least one byte: refuse a count the input cannot hold.
            if count > data.len() {
                return Err(Error::Truncated);
            }
            let mut items = Vec::with_capacity(count);
            for _ in 0..count {
                items.push(decode_at(data, depth + 1)?);
            }
            Value::StrictArray(items)
        }
        DATE => {
            let ms = take_f64(data)?;
            let tz = take_u16(data)? as i16;
            Value::Date(ms, tz)
        }
        LONG_STRING | XML_DOCUMENT => {
            let len = take_u32(data)? as usize;
            let s = take_string(data, len)?;
            if marker == LONG_STRING {
                Value::LongString(s)
            } else {
                Value::XmlDocument(s)
            }
        }
        TYPED_OBJECT => {
            let class = short_string(data)?;
            Value::TypedObject(class, properties(data, depth)?)
        }
        other => return Err(Error::UnsupportedMarker(other)),
    })
}

/// Appends the encoding of `value` to `out`.
pub fn encode(value: &Value, out: &mut BytesMut) {
    match value {
        Value::Number(n) => {
            out.put_u8(NUMBER);
            out.put_f64(*n);
        }
        Value::Boolean(b) => {
            out.put_u8(BOOLEAN);
            out.put_u8(u8::from(*b));
        }
        Value::String(s) if s.len() <= usize::from(u16::MAX) => {
            out.put_u8(STRING);
            put_short_string(out, s);
        }
        Value::String(s) | Value::LongString(s) => {
            out.put_u8(LONG_STRING);
            out.put_u32(s.len() as u32);
            out.put_slice(s.as_bytes());
        }
        Value::Object(props) => {
            out.put_u8(OBJECT);
            put_properties(out, props);
        }
        Value::Null => out.put_u8(NULL),
        Value::Undefined => out.put_u8(UNDEFINED),
        Value::EcmaArray(props) => {
            out.put_u8(ECMA_ARRAY);
            out.put_u32(props.len() as u32);
            put_properties(out, props);
        }
        Value::StrictArray(items) => {
            out.put_u8(STRICT_ARRAY);
            out.put_u32(items.len() as u32);
            for item in items {
                encode(item, out);
            }
        }
        Value::Date(ms, tz) => {
            out.put_u8(DATE);
            out.put_f64(*ms);
            out.put_i16(*tz);
        }
        Value::XmlDocument(s) => {
            out.put_u8(XML_DOCUMENT);
            out.put_u32(s.len() as u32);
            out.put_slice(s.as_bytes());
        }
        Value::TypedObject(class, props) => {
            out.put_u8(TYPED_OBJECT);
            put_short_string(out, class);
            put_properties(out, props);
        }
    }
}

/// Encodes a sequence of values (a command or data message body).
pub fn encode_all(values: &[Value]) -> BytesMut {
    let mut out = BytesMut::new();
    for v in values {
        encode(v, &mut out);
    }
    out
}

fn put_short_string(out: &mut BytesMut, s: &str) {
    let bytes = &s.as_bytes()[..s.len().min(usize::from(u16::MAX))];
    out.put_u16(bytes.len() as u16);
    out.put_slice(bytes);
}

fn put_properties(out: &mut BytesMut, props: &[(String, Value)]) {
    for (k, v) in props {
        put_short_string(out, k);
        encode(v, out);
    }
    out.put_slice(&[0, 0, OBJECT_END]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_type() {
        let values = vec![
            Value::string("connect"),
            Value::Number(1.0),
            Value::object([
                ("app", Value::string("live")),
                ("supportsGoAway", Value::Boolean(true)),
                ("capsEx", Value::Number(1.0)),
                (
                    "nested",
                    Value::EcmaArray(vec![(
                        "a".into(),
                        Value::StrictArray(vec![Value::Null, Value::Undefined]),
                    )]),
                ),
            ]),
            Value::Date(1.5e12, 0),
            Value::LongString("x".repeat(70_000)),
            Value::XmlDocument("<a/>".into()),
            Value::TypedObject("Cls".into(), vec![("k".into(), Value::Number(2.0))]),
        ];
        let bytes = encode_all(&values);
        let decoded = decode_all(&bytes).unwrap();
        assert_eq!(decoded, values);
        assert_eq!(decoded[2].get("capsEx").and_then(Value::as_number), Some(1.0));
    }

    #[test]
    fn decodes_ffmpeg_connect_bytes() {
        // The start of a connect command as ffmpeg 5.1 sends it.
        let bytes: &[u8] = &[
            0x02, 0x00, 0x07, b'c', b'o', b'n', b'n', b'e', b'c', b't', 0x00, 0x3f, 0xf0, 0, 0, 0, 0, 0, 0, 0x03, 0x00,
            0x03, b'a', b'p', b'p', 0x02, 0x00, 0x04, b'l', b'i', b'v', b'e', 0x00, 0x00, 0x09,
        ];
        let v = decode_all(bytes).unwrap();
        assert_eq!(v[0].as_str(), Some("connect"));
        assert_eq!(v[1].as_number(), Some(1.0));
        assert_eq!(v[2].get("app").and_then(Value::as_str), Some("live"));
    }

    #[test]
    fn hostile_input_is_refused() {
        // 100 nested objects.
        let mut deep = Vec::new();
        for _ in 0..100 {
            deep.extend_from_slice(&[OBJECT, 0, 1, b'k']);
        }
        assert_eq!(decode_all(&deep), Err(Error::TooDeep));
        // A string announcing more bytes than there are.
        assert_eq!(decode_all(&[STRING, 0xff, 0xff, b'a']), Err(Error::Truncated));
        assert_eq!(
            decode_all(&[LONG_STRING, 0xff, 0xff, 0xff, 0xff]),
            Err(Error::Truncated)
        );
        // A strict array announcing four billion elements.
        assert_eq!(
            decode_all(&[STRICT_ARRAY, 0xff, 0xff, 0xff, 0xff]),
            Err(Error::TooManyItems)
        );
        assert_eq!(decode_all(&[0x11]), Err(Error::UnsupportedMarker(0x11)));
        assert_eq!(decode_all(&[NUMBER, 1, 2]), Err(Error::Truncated));
    }
}
