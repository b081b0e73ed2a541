//! RTMP messages: protocol control, user control, commands, data and media.

use bytes::{BufMut, Bytes, BytesMut};
use thiserror::Error;

use crate::amf0::{self, Value};
use crate::chunk::RawMessage;

pub const SET_CHUNK_SIZE: u8 = 1;
pub const ABORT: u8 = 2;
pub const ACKNOWLEDGEMENT: u8 = 3;
pub const USER_CONTROL: u8 = 4;
pub const WINDOW_ACK_SIZE: u8 = 5;
pub const SET_PEER_BANDWIDTH: u8 = 6;
pub const AUDIO: u8 = 8;
pub const VIDEO: u8 = 9;
pub const DATA_AMF3: u8 = 15;
pub const COMMAND_AMF3: u8 = 17;
pub const DATA_AMF0: u8 = 18;
pub const COMMAND_AMF0: u8 = 20;
/// Facebook's RTMP Go Away.
pub const GO_AWAY: u8 = 32;

/// Chunk stream for protocol control messages.
pub const CSID_CONTROL: u32 = 2;
/// Chunk stream for commands.
pub const CSID_COMMAND: u32 = 3;
/// Chunk streams for media and data on the publish stream.
pub const CSID_AUDIO: u32 = 4;
pub const CSID_VIDEO: u32 = 6;
pub const CSID_DATA: u32 = 5;

/// Largest command a peer may send; commands are small, and the AMF0
/// decoder's memory is bounded by its input.
pub const MAX_COMMAND_LEN: usize = 64 * 1024;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    #[error("{kind} message has {len} bytes")]
    BadLength { kind: &'static str, len: usize },
    #[error("command of {0} bytes exceeds {MAX_COMMAND_LEN}")]
    CommandTooLong(usize),
    #[error("command is malformed: {0}")]
    BadCommand(&'static str),
    #[error(transparent)]
    Amf0(#[from] amf0::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// User Control events used by publishers and servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserControl {
    StreamBegin(u32),
    StreamEof(u32),
    SetBufferLength(u32, u32),
    PingRequest(u32),
    PingResponse(u32),
    Other(u16),
}

/// An AMF0 command: name, transaction id, command object and arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub name: String,
    pub transaction: f64,
    /// The command object (often `Null`) followed by the optional arguments.
    pub args: Vec<Value>,
}

impl Command {
    pub fn new(name: &str, transaction: f64, args: Vec<Value>) -> Self {
        Self {
            name: name.to_owned(),
            transaction,
            args,
        }
    }

    pub fn object(&self) -> Option<&Value> {
        self.args.first()
    }

    /// The argument after the command object (`publish`'s stream name, ...).
    pub fn arg(&self, i: usize) -> Option<&Value> {
        self.args.get(i + 1)
    }
}

/// A decoded message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    SetChunkSize(u32),
    Abort(u32),
    Acknowledgement(u32),
    WindowAckSize(u32),
    SetPeerBandwidth(u32, u8),
    UserControl(UserControl),
    Command {
        stream_id: u32,
        command: Command,
    },
    /// A data message (`@setDataFrame`, `onMetaData`), kept as bytes.
    Data {
        stream_id: u32,
        timestamp: u32,
        payload: Bytes,
    },
    Audio {
        stream_id: u32,
        timestamp: u32,
        payload: Bytes,
    },
    Video {
        stream_id: u32,
        timestamp: u32,
        payload: Bytes,
    },
    GoAway(Bytes),
    Unknown(RawMessage),
}

fn be_u32(p: &[u8], kind: &'static str) -> Result<u32> {
    match p {
        [a, b, c, d, ..] => Ok(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => Err(Error::BadLength { kind, len: p.len() }),
    }
}

impl Message {
    /// Decodes a raw message.
    pub fn decode(raw: RawMessage) -> Result<Message> {
        let p = &raw.payload[..];
        Ok(match raw.type_id {
            SET_CHUNK_SIZE => Message::SetChunkSize(be_u32(p, "Set Chunk Size")? & 0x7fff_ffff),
            ABORT => Message::Abort(be_u32(p, "Abort")?),
            ACKNOWLEDGEMENT => Message::Acknowledgement(be_u32(p, "Acknowledgement")?),
            WINDOW_ACK_SIZE => Message::WindowAckSize(be_u32(p, "Window Acknowledgement Size")?),
            SET_PEER_BANDWIDTH => {
                let size = be_u32(p, "Set Peer Bandwidth")?;
                Message::SetPeerBandwidth(size, p.get(4).copied().unwrap_or(2))
            }
            USER_CONTROL => {
                if p.len() < 2 {
                    return Err(Error::BadLength {
                        kind: "User Control",
                        len: p.len(),
                    });
                }
                let event = u16::from_be_bytes([p[0], p[1]]);
                let body = &p[2..];
                let ev = match event {
                    0 => UserControl::StreamBegin(be_u32(body, "StreamBegin")?),
                    1 => UserControl::StreamEof(be_u32(body, "StreamEOF")?),
                    3 => UserControl::SetBufferLength(
                        be_u32(body, "SetBufferLength")?,
                        be_u32(body.get(4..).unwrap_or_default(), "SetBufferLength")?,
                    ),
                    6 => UserControl::PingRequest(be_u32(body, "PingRequest")?),
                    7 => UserControl::PingResponse(be_u32(body, "PingResponse")?),
                    other => UserControl::Other(other),
                };
                Message::UserControl(ev)
            }
            COMMAND_AMF0 | COMMAND_AMF3 => {
                if p.len() > MAX_COMMAND_LEN {
                    return Err(Error::CommandTooLong(p.len()));
                }
                // An AMF3 command starts with one format byte, then AMF0 values.
                let body = if raw.type_id == COMMAND_AMF3 {
                    p.get(1..).unwrap_or_default()
                } else {
                    p
                };
                let mut values = amf0::decode_all(body)?.into_iter();
                let name = match values.next() {
                    Some(Value::String(s)) => s,
                    _ => return Err(Error::BadCommand("the command name is not a string")),
                };
                let transaction = values.next().and_then(|v| v.as_number()).unwrap_or(0.0);
                Message::Command {
                    stream_id: raw.stream_id,
                    command: Command {
                        name,
                        transaction,
                        args: values.collect(),
                    },
                }
            }
            DATA_AMF0 | DATA_AMF3 => Message::Data {
                stream_id: raw.stream_id,
                timestamp: raw.timestamp,
                payload: raw.payload,
            },
            AUDIO => Message::Audio {
                stream_id: raw.stream_id,
                timestamp: raw.timestamp,
                payload: raw.payload,
            },
            VIDEO => Message::Video {
                stream_id: raw.stream_id,
                timestamp: raw.timestamp,
                payload: raw.payload,
            },
            GO_AWAY => Message::GoAway(raw.payload),
            _ => Message::Unknown(raw),
        })
    }

    /// Encodes the message for sending.
    pub fn encode(&self) -> RawMessage {
        let control = |type_id: u8, payload: Vec<u8>| RawMessage {
            csid: CSID_CONTROL,
            timestamp: 0,
            type_id,
            stream_id: 0,
            payload: Bytes::from(payload),
        };
        match self {
            Message::SetChunkSize(n) => control(SET_CHUNK_SIZE, n.to_be_bytes().to_vec()),
            Message::Abort(n) => control(ABORT, n.to_be_bytes().to_vec()),
            Message::Acknowledgement(n) => control(ACKNOWLEDGEMENT, n.to_be_bytes().to_vec()),
            Message::WindowAckSize(n) => control(WINDOW_ACK_SIZE, n.to_be_bytes().to_vec()),
            Message::SetPeerBandwidth(n, limit) => {
                let mut p = n.to_be_bytes().to_vec();
                p.push(*limit);
                control(SET_PEER_BANDWIDTH, p)
            }
            Message::UserControl(ev) => control(USER_CONTROL, ev.encode()),
            Message::Command { stream_id, command } => {
                let mut values = Vec::with_capacity(command.args.len() + 2);
                values.push(Value::String(command.name.clone()));
                values.push(Value::Number(command.transaction));
                values.extend(command.args.iter().cloned());
                RawMessage {
                    csid: CSID_COMMAND,
                    timestamp: 0,
                    type_id: COMMAND_AMF0,
                    stream_id: *stream_id,
                    payload: amf0::encode_all(&values).freeze(),
                }
            }
            Message::Data {
                stream_id,
                timestamp,
                payload,
            } => stream_message(CSID_DATA, DATA_AMF0, *stream_id, *timestamp, payload),
            Message::Audio {
                stream_id,
                timestamp,
                payload,
            } => stream_message(CSID_AUDIO, AUDIO, *stream_id, *timestamp, payload),
            Message::Video {
                stream_id,
                timestamp,
                payload,
            } => stream_message(CSID_VIDEO, VIDEO, *stream_id, *timestamp, payload),
            Message::GoAway(payload) => control(GO_AWAY, payload.to_vec()),
            Message::Unknown(raw) => raw.clone(),
        }
    }

    pub fn command(stream_id: u32, name: &str, transaction: f64, args: Vec<Value>) -> Message {
        Message::Command {
            stream_id,
            command: Command::new(name, transaction, args),
        }
    }
}

/// A message of a stream (data, audio, video) on its chunk stream.
fn stream_message(csid: u32, type_id: u8, stream_id: u32, timestamp: u32, payload: &Bytes) -> RawMessage {
    RawMessage {
        csid,
        timestamp,
        type_id,
        stream_id,
        payload: payload.clone(),
    }
}

impl UserControl {
    /// The event's payload: its type, then its fields.
    fn encode(&self) -> Vec<u8> {
        let mut p = BytesMut::new();
        match *self {
            UserControl::StreamBegin(id) => {
                p.put_u16(0);
                p.put_u32(id);
            }
            UserControl::StreamEof(id) => {
                p.put_u16(1);
                p.put_u32(id);
            }
            UserControl::SetBufferLength(id, ms) => {
                p.put_u16(3);
                p.put_u32(id);
                p.put_u32(ms);
            }
            UserControl::PingRequest(t) => {
                p.put_u16(6);
                p.put_u32(t);
            }
            UserControl::PingResponse(t) => {
                p.put_u16(7);
                p.put_u32(t);
            }
            UserControl::Other(e) => p.put_u16(e),
        }
        p.to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_and_user_control_round_trip() {
        for m in [
            Message::SetChunkSize(4096),
            Message::Abort(4),
            Message::Acknowledgement(12345),
            Message::WindowAckSize(2_500_000),
            Message::SetPeerBandwidth(2_500_000, 2),
            Message::UserControl(UserControl::StreamBegin(1)),
            Message::UserControl(UserControl::PingRequest(77)),
            Message::UserControl(UserControl::PingResponse(77)),
            Message::UserControl(UserControl::SetBufferLength(1, 3000)),
            Message::GoAway(Bytes::from_static(&[0, 0, 0, 0])),
        ] {
            assert_eq!(Message::decode(m.encode()).unwrap(), m);
        }
    }

    #[test]
    fn go_away_goes_on_chunk_stream_2_message_stream_0() {
        let raw = Message::GoAway(Bytes::from_static(&[0; 4])).encode();
        assert_eq!((raw.csid, raw.stream_id, raw.type_id, raw.payload.len()), (2, 0, 32, 4));
    }

    #[test]
    fn command_round_trip_and_errors() {
        let m = Message::command(
            1,
            "publish",
            0.0,
            vec![Value::Null, Value::string("key"), Value::string("live")],
        );
        let Message::Command { command, .. } = Message::decode(m.encode()).unwrap() else {
            panic!("not a command")
        };
        assert_eq!(command.arg(0).and_then(Value::as_str), Some("key"));
        let bad = RawMessage {
            csid: 3,
            timestamp: 0,
            type_id: 20,
            stream_id: 0,
            payload: Bytes::from_static(&[0, 0, 0, 0, 0, 0, 0, 0, 0]),
        };
        assert!(matches!(Message::decode(bad), Err(Error::BadCommand(_))));
        let short = RawMessage {
            csid: 2,
            timestamp: 0,
            type_id: 1,
            stream_id: 0,
            payload: Bytes::from_static(&[0, 1]),
        };
        assert!(matches!(Message::decode(short), Err(Error::BadLength { .. })));
    }
}
