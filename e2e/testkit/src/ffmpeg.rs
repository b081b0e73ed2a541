//! ffmpeg publishing a synthetic test stream (lavfi's `testsrc` as H.264, a
//! 440 Hz sine as AAC): the incapable publisher, which announces neither Go
//! Away nor Reconnect Request. One command line for the integration tests
//! and the end-to-end suites; what differs between them is a field.

use std::path::Path;

use tokio::process::Command;

/// The stream ffmpeg publishes. [`TestStream::new`] is the common case;
/// callers change fields with struct update syntax.
#[derive(Clone, Debug)]
pub struct TestStream {
    /// Seconds of media (`-t`).
    pub seconds: u32,
    /// Read the input at its native frame rate (`-re`), as a live encoder sends.
    pub realtime: bool,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    /// Frames from one keyframe to the next (`-g`).
    pub gop: u32,
    /// x264's `-tune zerolatency`.
    pub zerolatency: bool,
    /// An AAC track besides the video.
    pub audio: bool,
    /// AAC bitrate (`-b:a`, e.g. `64k`); ffmpeg's default when `None`.
    pub audio_bitrate: Option<&'static str>,
    /// ffmpeg's `-loglevel`.
    pub loglevel: &'static str,
    /// `-nostdin`: ffmpeg leaves standard input (and the terminal) alone.
    pub nostdin: bool,
}

impl TestStream {
    /// `seconds` of 320x240 video at 30 fps with a keyframe a second, and
    /// audio, in real time; errors only on stderr.
    pub fn new(seconds: u32) -> Self {
        Self {
            seconds,
            realtime: true,
            width: 320,
            height: 240,
            fps: 30,
            gop: 30,
            zerolatency: false,
            audio: true,
            audio_bitrate: None,
            loglevel: "error",
            nostdin: false,
        }
    }

    /// ffmpeg publishing the stream to `url` (`rtmp://.../<app>/<stream>`).
    pub fn command(&self, url: &str) -> Command {
        let mut cmd = self.inputs();
        self.encoding(&mut cmd);
        cmd.args(["-f", "flv", url]);
        cmd
    }

    /// ffmpeg publishing the stream to `url` and writing the same FLV to
    /// `copy` (the tee muxer), so a test can compare what it sent with what
    /// arrived.
    pub fn command_with_copy(&self, url: &str, copy: &Path) -> Command {
        let mut cmd = self.inputs();
        // The tee muxer selects no stream by itself.
        cmd.args(["-map", "0:v"]);
        if self.audio {
            cmd.args(["-map", "1:a"]);
        }
        self.encoding(&mut cmd);
        // The tee muxer does not ask the encoders for the global headers
        // that FLV's sequence headers are made of.
        cmd.args(["-flags", "+global_header", "-f", "tee"])
            .arg(format!("[f=flv]{url}|[f=flv]{}", copy.display()));
        cmd
    }

    /// The program, its global options, the synthetic inputs and the duration.
    fn inputs(&self) -> Command {
        let mut cmd = Command::new("ffmpeg");
        cmd.args(["-hide_banner", "-loglevel", self.loglevel]);
        if self.nostdin {
            cmd.arg("-nostdin");
        }
        if self.realtime {
            cmd.arg("-re");
        }
        let video = format!("testsrc=size={}x{}:rate={}", self.width, self.height, self.fps);
        cmd.args(["-f", "lavfi", "-i", &video]);
        if self.audio {
            cmd.args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"]);
        }
        cmd.args(["-t", &self.seconds.to_string()]);
        cmd
    }

    /// The encoders and their settings.
    fn encoding(&self, cmd: &mut Command) {
        cmd.args(["-c:v", "libx264", "-preset", "ultrafast"]);
        if self.zerolatency {
            cmd.args(["-tune", "zerolatency"]);
        }
        cmd.args(["-g", &self.gop.to_string(), "-pix_fmt", "yuv420p"]);
        if self.audio {
            cmd.args(["-c:a", "aac"]);
            if let Some(bitrate) = self.audio_bitrate {
                cmd.args(["-b:a", bitrate]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(cmd: &Command) -> String {
        let std = cmd.as_std();
        std::iter::once(std.get_program())
            .chain(std.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn the_common_stream_publishes_video_and_audio_as_flv() {
        assert_eq!(
            argv(&TestStream::new(5).command("rtmp://h/live/s")),
            "ffmpeg -hide_banner -loglevel error -re \
             -f lavfi -i testsrc=size=320x240:rate=30 -f lavfi -i sine=frequency=440:sample_rate=44100 -t 5 \
             -c:v libx264 -preset ultrafast -g 30 -pix_fmt yuv420p -c:a aac -f flv rtmp://h/live/s"
        );
    }

    #[test]
    fn video_only_quiet_and_without_stdin() {
        let stream = TestStream {
            audio: false,
            loglevel: "quiet",
            nostdin: true,
            realtime: false,
            ..TestStream::new(60)
        };
        assert_eq!(
            argv(&stream.command("rtmp://h/live/s")),
            "ffmpeg -hide_banner -loglevel quiet -nostdin -f lavfi -i testsrc=size=320x240:rate=30 -t 60 \
             -c:v libx264 -preset ultrafast -g 30 -pix_fmt yuv420p -f flv rtmp://h/live/s"
        );
    }

    #[test]
    fn a_copy_goes_through_the_tee_muxer_with_explicit_maps() {
        let stream = TestStream {
            zerolatency: true,
            audio_bitrate: Some("64k"),
            ..TestStream::new(3)
        };
        assert_eq!(
            argv(&stream.command_with_copy("rtmp://h/live/s", Path::new("/tmp/sent.flv"))),
            "ffmpeg -hide_banner -loglevel error -re \
             -f lavfi -i testsrc=size=320x240:rate=30 -f lavfi -i sine=frequency=440:sample_rate=44100 -t 3 \
             -map 0:v -map 1:a -c:v libx264 -preset ultrafast -tune zerolatency -g 30 -pix_fmt yuv420p \
             -c:a aac -b:a 64k -flags +global_header -f tee [f=flv]rtmp://h/live/s|[f=flv]/tmp/sent.flv"
        );
        let video_only = TestStream {
            audio: false,
            ..TestStream::new(3)
        };
        assert!(
            argv(&video_only.command_with_copy("rtmp://h/live/s", Path::new("/tmp/sent.flv")))
                .contains(" -t 3 -map 0:v -c:v libx264 ")
        );
    }
}
