//! Workspace tools for the native providers: bash, read/write/edit files, glob, grep and
//! web fetch. Relative paths are taken from the agent's folder.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::{Value, json};

use super::{ToolLimits, ToolResult, cap, object_schema, text};
use crate::model::ToolSpec;

/// Files a search looks at, at most (a runaway `**` in a big tree stops here).
const MAX_WALK: usize = 20_000;
/// Matches a search returns, at most.
const MAX_MATCHES: usize = 500;

pub fn specs() -> Vec<ToolSpec> {
    vec![
        ToolSpec {
            name: "bash",
            description: "Run a shell command in your workspace. Output is capped; a command that runs past its timeout is killed.",
            schema: object_schema(
                json!({
                    "command": {"type": "string"},
                    "timeout_secs": {"type": "integer", "description": "default 120, at most 600"},
                }),
                &["command"],
            ),
        },
        ToolSpec {
            name: "read_file",
            description: "Read a text file, with line numbers.",
            schema: object_schema(
                json!({
                    "path": {"type": "string"},
                    "offset": {"type": "integer", "description": "first line (1-based)"},
                    "limit": {"type": "integer", "description": "lines to read (default 2000)"},
                }),
                &["path"],
            ),
        },
        ToolSpec {
            name: "write_file",
            description: "Write a file (replacing it), creating its folders.",
            schema: object_schema(
                json!({"path": {"type": "string"}, "content": {"type": "string"}}),
                &["path", "content"],
            ),
        },
        ToolSpec {
            name: "edit_file",
            description: "Replace old_string with new_string in a file. old_string must occur exactly once unless replace_all is true.",
            schema: object_schema(
                json!({
                    "path": {"type": "string"},
                    "old_string": {"type": "string"},
                    "new_string": {"type": "string"},
                    "replace_all": {"type": "boolean"},
                }),
                &["path", "old_string", "new_string"],
            ),
        },
        ToolSpec {
            name: "glob",
            description: "Find files by pattern (`*`, `?`, `**` for any depth), e.g. \"src/**/*.rs\".",
            schema: object_schema(
                json!({"pattern": {"type": "string"}, "path": {"type": "string"}}),
                &["pattern"],
            ),
        },
        ToolSpec {
            name: "grep",
            description: "Search file contents with a regular expression; returns path:line: text.",
            schema: object_schema(
                json!({
                    "pattern": {"type": "string"},
                    "path": {"type": "string"},
                    "glob": {"type": "string", "description": "only files matching this pattern"},
                }),
                &["pattern"],
            ),
        },
        ToolSpec {
            name: "web_fetch",
            description: "Fetch a URL (http or https) and return its text.",
            schema: object_schema(json!({"url": {"type": "string"}}), &["url"]),
        },
    ]
}

/// A path from the model: absolute as given, relative to the workspace otherwise.
pub fn resolve(workspace: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        workspace.join(p)
    }
}

pub async fn bash(input: &Value, workspace: &Path, limits: &ToolLimits) -> ToolResult {
    let command = text(input, "command")?;
    let timeout = input["timeout_secs"]
        .as_u64()
        .map(|s| std::time::Duration::from_secs(s.clamp(1, 600)))
        .unwrap_or(limits.bash_timeout);
    std::fs::create_dir_all(workspace).map_err(|e| format!("workspace: {e}"))?;
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .current_dir(workspace)
        // The session's proxy token is the agent's business, not the commands'.
        .env_remove("FERROCLAW_MODEL_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start sh: {e}"))?;
    let pid = child.id();
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(output)) => {
            let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
            let stderr = String::from_utf8_lossy(&output.stderr);
            if !stderr.is_empty() {
                text.push_str("\n[stderr]\n");
                text.push_str(&stderr);
            }
            let code = output
                .status
                .code()
                .map_or_else(|| "killed by a signal".to_string(), |c| c.to_string());
            let body = cap(&text, limits.output_cap);
            if output.status.success() {
                Ok(format!("exit code 0\n{body}"))
            } else {
                Err(format!("exit code {code}\n{body}"))
            }
        }
        Ok(Err(e)) => Err(format!("running the command: {e}")),
        Err(_) => {
            if let Some(pid) = pid {
                // SAFETY: kill(2) on the process group we created; no memory is touched.
                unsafe {
                    libc::kill(-(pid as libc::pid_t), libc::SIGKILL);
                }
            }
            Err(format!(
                "the command ran longer than {} s and was killed",
                timeout.as_secs()
            ))
        }
    }
}

pub fn read_file(input: &Value, workspace: &Path, limits: &ToolLimits) -> ToolResult {
    let path = resolve(workspace, text(input, "path")?);
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let content = String::from_utf8(bytes)
        .map_err(|_| format!("{} is not a text file (UTF-8)", path.display()))?;
    let offset = input["offset"].as_u64().unwrap_or(1).max(1) as usize;
    let limit = input["limit"].as_u64().unwrap_or(2000) as usize;
    let lines: Vec<String> = content
        .lines()
        .enumerate()
        .skip(offset - 1)
        .take(limit)
        .map(|(i, line)| format!("{:>6}\t{line}", i + 1))
        .collect();
    if lines.is_empty() {
        return Ok(format!(
            "(no lines from line {offset}; the file has {})",
            content.lines().count()
        ));
    }
    Ok(cap(&lines.join("\n"), limits.output_cap))
}

pub fn write_file(input: &Value, workspace: &Path) -> ToolResult {
    let path = resolve(workspace, text(input, "path")?);
    let content = text(input, "content")?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    std::fs::write(&path, content).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(format!(
        "wrote {} bytes to {}",
        content.len(),
        path.display()
    ))
}

pub fn edit_file(input: &Value, workspace: &Path) -> ToolResult {
    let path = resolve(workspace, text(input, "path")?);
    let old = text(input, "old_string")?;
    let new = text(input, "new_string")?;
    if old.is_empty() {
        return Err("old_string is empty".into());
    }
    let content = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let count = content.matches(old).count();
    let replace_all = input["replace_all"].as_bool().unwrap_or(false);
    let edited = match (count, replace_all) {
        (0, _) => return Err(format!("old_string does not occur in {}", path.display())),
        (1, _) | (_, true) => content.replace(old, new),
        (n, false) => {
            return Err(format!(
                "old_string occurs {n} times in {}: give more context or set replace_all",
                path.display()
            ));
        }
    };
    std::fs::write(&path, edited).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(format!(
        "replaced {count} occurrence(s) in {}",
        path.display()
    ))
}

/// A glob pattern as an anchored regular expression over `/`-separated relative paths.
fn glob_regex(pattern: &str) -> Result<regex::Regex, String> {
    let mut re = String::from("^");
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' if chars.peek() == Some(&'*') => {
                chars.next();
                if chars.peek() == Some(&'/') {
                    chars.next();
                    re.push_str("(?:.*/)?");
                } else {
                    re.push_str(".*");
                }
            }
            '*' => re.push_str("[^/]*"),
            '?' => re.push_str("[^/]"),
            c => re.push_str(&regex::escape(&c.to_string())),
        }
    }
    re.push('$');
    regex::Regex::new(&re).map_err(|e| format!("bad pattern {pattern:?}: {e}"))
}

/// Files under `root` (relative paths), skipping hidden folders such as `.git`.
fn walk(root: &Path) -> Vec<String> {
    walkdir::WalkDir::new(root)
        .into_iter()
        .filter_entry(|e| e.depth() == 0 || !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .take(MAX_WALK)
        .filter_map(|e| {
            e.path()
                .strip_prefix(root)
                .ok()
                .map(|p| p.to_string_lossy().into_owned())
        })
        .collect()
}

pub fn glob(input: &Value, workspace: &Path) -> ToolResult {
    let matcher = glob_regex(text(input, "pattern")?)?;
    let root = resolve(workspace, input["path"].as_str().unwrap_or("."));
    let mut found: Vec<String> = walk(&root)
        .into_iter()
        .filter(|p| matcher.is_match(p))
        .collect();
    found.sort();
    if found.is_empty() {
        return Ok("no files match".into());
    }
    let more = found.len().saturating_sub(MAX_MATCHES);
    found.truncate(MAX_MATCHES);
    let mut out = found.join("\n");
    if more > 0 {
        out.push_str(&format!("\n[… {more} more]"));
    }
    Ok(out)
}

pub fn grep(input: &Value, workspace: &Path, limits: &ToolLimits) -> ToolResult {
    let pattern = text(input, "pattern")?;
    let matcher = regex::Regex::new(pattern).map_err(|e| format!("bad pattern: {e}"))?;
    let only = input["glob"].as_str().map(glob_regex).transpose()?;
    let root = resolve(workspace, input["path"].as_str().unwrap_or("."));
    let files = if root.is_file() {
        vec![String::new()]
    } else {
        walk(&root)
    };
    let mut hits = Vec::new();
    'files: for rel in files {
        if let Some(only) = &only
            && !only.is_match(&rel)
        {
            continue;
        }
        let path = if rel.is_empty() {
            root.clone()
        } else {
            root.join(&rel)
        };
        let Ok(content) = std::fs::read_to_string(&path) else {
            continue; // binary or unreadable
        };
        for (i, line) in content.lines().enumerate() {
            if matcher.is_match(line) {
                hits.push(format!("{}:{}: {line}", path.display(), i + 1));
                if hits.len() >= MAX_MATCHES {
                    break 'files;
                }
            }
        }
    }
    if hits.is_empty() {
        return Ok("no matches".into());
    }
    Ok(cap(&hits.join("\n"), limits.output_cap))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ToolLimits {
        ToolLimits {
            bash_timeout: std::time::Duration::from_secs(1),
            output_cap: 200,
            ..ToolLimits::default()
        }
    }

    #[tokio::test]
    async fn bash_reports_exit_codes_caps_output_and_kills_on_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path();
        let ok = bash(&json!({"command": "echo hi; echo oops >&2"}), ws, &limits()).await;
        assert_eq!(ok.unwrap(), "exit code 0\nhi\n\n[stderr]\noops\n");
        let failed = bash(&json!({"command": "exit 3"}), ws, &limits()).await;
        assert!(failed.unwrap_err().starts_with("exit code 3"));
        let long = bash(&json!({"command": "seq 1 10000"}), ws, &limits())
            .await
            .unwrap();
        assert!(
            long.contains("characters cut") && long.len() < 400,
            "{long}"
        );
        let started = std::time::Instant::now();
        let hung = bash(&json!({"command": "sleep 30"}), ws, &limits()).await;
        assert!(hung.unwrap_err().contains("longer than 1 s"));
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        assert!(
            bash(&json!({}), ws, &limits())
                .await
                .unwrap_err()
                .contains("command")
        );
    }

    #[test]
    fn files_are_written_read_edited_and_found() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path();
        write_file(
            &json!({"path": "a/b.txt", "content": "one\ntwo\ntwo\n"}),
            ws,
        )
        .unwrap();
        let read = read_file(
            &json!({"path": "a/b.txt", "offset": 2, "limit": 1}),
            ws,
            &limits(),
        );
        assert_eq!(read.unwrap(), "     2\ttwo");
        let twice = edit_file(
            &json!({"path": "a/b.txt", "old_string": "two", "new_string": "2"}),
            ws,
        );
        assert!(twice.unwrap_err().contains("occurs 2 times"));
        let missing = edit_file(
            &json!({"path": "a/b.txt", "old_string": "zz", "new_string": "2"}),
            ws,
        );
        assert!(missing.unwrap_err().contains("does not occur"));
        edit_file(
            &json!({"path": "a/b.txt", "old_string": "two", "new_string": "2", "replace_all": true}),
            ws,
        )
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(ws.join("a/b.txt")).unwrap(),
            "one\n2\n2\n"
        );
        assert_eq!(
            glob(&json!({"pattern": "**/*.txt"}), ws).unwrap(),
            "a/b.txt"
        );
        let hits = grep(
            &json!({"pattern": "^2$", "glob": "**/*.txt"}),
            ws,
            &limits(),
        )
        .unwrap();
        assert_eq!(hits.lines().count(), 2, "{hits}");
        assert!(read_file(&json!({"path": "nope"}), ws, &limits()).is_err());
        assert!(
            grep(&json!({"pattern": "("}), ws, &limits())
                .unwrap_err()
                .contains("bad pattern")
        );
    }

    #[test]
    fn glob_patterns() {
        let m = glob_regex("src/**/*.rs").unwrap();
        assert!(m.is_match("src/a.rs"));
        assert!(m.is_match("src/x/y/a.rs"));
        assert!(!m.is_match("src/a.txt"));
        assert!(!m.is_match("other/a.rs"));
        let m = glob_regex("*.md").unwrap();
        assert!(m.is_match("AGENT.md"));
        assert!(!m.is_match("x/AGENT.md"));
        assert!(glob_regex("a+b?.c").unwrap().is_match("a+bx.c"));
    }
}
