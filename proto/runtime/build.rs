//! The commit the binaries are built from, for their `_build_info` metric:
//! `INGEST_BUILD_COMMIT` if set (builds outside a git checkout), else
//! `git rev-parse`, else "unknown".

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=INGEST_BUILD_COMMIT");
    let commit = std::env::var("INGEST_BUILD_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(git_commit);
    println!(
        "cargo:rustc-env=INGEST_BUILD_COMMIT={}",
        commit.as_deref().unwrap_or("unknown")
    );
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn git_commit() -> Option<String> {
    // Built again when HEAD moves: HEAD itself (a checkout) and the branch
    // it points at (a commit), wherever this checkout keeps them.
    let branch = git(&["symbolic-ref", "-q", "HEAD"]);
    let files = ["HEAD", "packed-refs"].into_iter().chain(branch.as_deref());
    for path in files.filter_map(|f| git(&["rev-parse", "--git-path", f])) {
        if Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    git(&["rev-parse", "--short=12", "HEAD"])
}
