//! Embeds the version and the last commit into the binary for `GET /health`.
//!
//! VERSION comes from the environment (`make build VERSION=v1.2.3`, default `local`). The commit
//! facts come from git; where there is no repository (a Docker build context, a source tarball)
//! they come from GIT_COMMIT, GIT_COMMIT_TIME and GIT_DIRTY, else they stay empty and the build
//! says so instead of failing.
use std::process::Command;

fn main() {
    for var in ["VERSION", "GIT_COMMIT", "GIT_COMMIT_TIME", "GIT_DIRTY"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    watch_git_state();
    let version = env_or("VERSION", "local");
    let (hash, time, dirty) = git_commit().unwrap_or_else(|| {
        let hash = env_or("GIT_COMMIT", "");
        if hash.is_empty() {
            println!("cargo:warning=no git commit and no GIT_COMMIT: /health reports no commit");
        }
        let dirty = env_or("GIT_DIRTY", "false") == "true";
        (hash, env_or("GIT_COMMIT_TIME", ""), dirty)
    });
    println!("cargo:rustc-env=VERSION={version}");
    println!("cargo:rustc-env=GIT_COMMIT={hash}");
    println!("cargo:rustc-env=GIT_COMMIT_TIME={time}");
    println!("cargo:rustc-env=GIT_DIRTY={dirty}");
}

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_owned())
}

/// The HEAD commit's hash, its time in UTC (RFC 3339) and whether tracked files differ from it.
fn git_commit() -> Option<(String, String, bool)> {
    let hash = git(&["rev-parse", "HEAD"])?;
    let time = git(&[
        "-c",
        "log.showSignature=false",
        "log",
        "-1",
        "--date=format-local:%Y-%m-%dT%H:%M:%SZ",
        "--format=%cd",
    ])?;
    let dirty = !git(&["--no-optional-locks", "status", "--porcelain", "--untracked-files=no"])?.is_empty();
    Some((hash, time, dirty))
}

/// Reruns this script when HEAD moves (a commit, a checkout, a reset) or a tracked file changes,
/// and only then, so that the hash and `dirtyBuild` stay right across incremental builds.
fn watch_git_state() {
    let Some(git_dir) = git(&["rev-parse", "--git-dir"]) else {
        return;
    };
    // logs/HEAD is missing until the first commit: cargo then reruns the script on every build.
    for file in ["HEAD", "index", "logs/HEAD"] {
        println!("cargo:rerun-if-changed={git_dir}/{file}");
    }
    for tracked in git(&["ls-files"]).unwrap_or_default().lines() {
        println!("cargo:rerun-if-changed={tracked}");
    }
}

/// Runs git in the package directory; None when git is missing or fails (no repository, no commit).
fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git")
        .args(args)
        .env("TZ", "UTC")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    output.status.success().then(|| text.trim().to_owned())
}
