//! The conversation as the model has seen it, kept in `out/state/transcript.json` so a
//! restarted agent (or container) carries on the same conversation.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::{Message, Usage};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Transcript {
    pub messages: Vec<Message>,
    /// Tokens of every request so far (for `/cost`).
    pub usage: Usage,
    pub requests: u64,
    /// Prompt tokens of the latest request: how full the context is (for `/context`).
    pub context_tokens: u64,
    pub compactions: u32,
    /// The latest turn: which inbound messages it answered and where it began. A batch that
    /// is redone (the agent died before completing it) replaces that turn instead of
    /// adding a second copy.
    pub last_turn: Option<TurnMark>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnMark {
    pub seqs: Vec<i64>,
    pub start: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("transcript {path}: {message}")]
pub struct TranscriptError {
    pub path: PathBuf,
    pub message: String,
}

impl Transcript {
    pub fn path_in(state_dir: &Path) -> PathBuf {
        state_dir.join("transcript.json")
    }

    /// Loads the transcript; a missing file is a new conversation. An unreadable one is
    /// set aside (renamed `.corrupt`) rather than stopping the agent for good.
    pub fn load(path: &Path) -> Self {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Self::default(),
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot read the transcript; starting fresh");
                return Self::default();
            }
        };
        match serde_json::from_slice(&bytes) {
            Ok(t) => t,
            Err(e) => {
                let aside = path.with_extension("json.corrupt");
                tracing::error!(path = %path.display(), error = %e, aside = %aside.display(), "unreadable transcript set aside; starting fresh");
                let _ = std::fs::rename(path, aside);
                Self::default()
            }
        }
    }

    /// Writes atomically (temporary file, fsync, rename): a crash leaves the old or the new.
    pub fn save(&self, path: &Path) -> Result<(), TranscriptError> {
        let fail = |message: String| TranscriptError {
            path: path.to_path_buf(),
            message,
        };
        let json = serde_json::to_vec(self).map_err(|e| fail(e.to_string()))?;
        ferroclaw_common::atomic_file::write(path, &json).map_err(|e| fail(e.to_string()))
    }

    /// Starts a turn for `seqs`, dropping an earlier unfinished attempt at the same ones.
    pub fn begin_turn(&mut self, seqs: &[i64]) -> usize {
        if let Some(mark) = &self.last_turn
            && mark.seqs == seqs
            && mark.start <= self.messages.len()
        {
            self.messages.truncate(mark.start);
        }
        let start = self.messages.len();
        self.last_turn = Some(TurnMark {
            seqs: seqs.to_vec(),
            start,
        });
        start
    }

    /// A rough token count (four characters a token), for before the API has said.
    pub fn estimate_tokens(messages: &[Message]) -> u64 {
        let chars: usize = messages
            .iter()
            .map(|m| serde_json::to_string(m).map(|s| s.len()).unwrap_or(0))
            .sum();
        (chars / 4) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_a_reload_and_a_redone_turn_replaces_itself() {
        let dir = tempfile::tempdir().unwrap();
        let path = Transcript::path_in(dir.path());
        let mut t = Transcript::load(&path);
        assert!(t.messages.is_empty());
        t.begin_turn(&[2]);
        t.messages.push(Message::user_text("first"));
        t.begin_turn(&[4]);
        t.messages.push(Message::user_text("second, attempt 1"));
        t.save(&path).unwrap();

        let mut again = Transcript::load(&path);
        assert_eq!(again.messages.len(), 2);
        again.begin_turn(&[4]);
        again.messages.push(Message::user_text("second, attempt 2"));
        assert_eq!(again.messages.len(), 2);
        assert_eq!(again.messages[1].text(), "second, attempt 2");
    }

    #[test]
    fn a_corrupt_file_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = Transcript::path_in(dir.path());
        std::fs::write(&path, b"{not json").unwrap();
        assert!(Transcript::load(&path).messages.is_empty());
        assert!(dir.path().join("transcript.json.corrupt").exists());
    }
}
