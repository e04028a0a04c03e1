//! Session commands answered by the agent itself, never by the model: `/clear`,
//! `/compact`, `/cost`, `/context` and `/files`. A batch is cut into model turns and commands, in
//! their order.

use ferroclaw_mailbox::InboundRow;
use ferroclaw_mailbox::content::InboundContent;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Clear,
    Compact,
    Cost,
    Context,
    Files,
}

/// A stretch of a batch: messages for one model turn, or one command.
#[derive(Debug)]
pub enum Segment<'a> {
    Turn(Vec<&'a InboundRow>),
    Command(Command, &'a InboundRow),
}

pub fn command_of(row: &InboundRow) -> Option<Command> {
    let InboundContent::Chat(chat) = &row.content else {
        return None;
    };
    match chat.text.split_whitespace().next()? {
        "/clear" => Some(Command::Clear),
        "/compact" => Some(Command::Compact),
        "/cost" => Some(Command::Cost),
        "/context" => Some(Command::Context),
        "/files" => Some(Command::Files),
        _ => None,
    }
}

/// Cuts rows (of one destination) into turns and commands, keeping their order.
pub fn segments<'a>(rows: &[&'a InboundRow]) -> Vec<Segment<'a>> {
    let mut out = Vec::new();
    let mut pending: Vec<&InboundRow> = Vec::new();
    for row in rows {
        match command_of(row) {
            Some(command) => {
                if !pending.is_empty() {
                    out.push(Segment::Turn(std::mem::take(&mut pending)));
                }
                out.push(Segment::Command(command, row));
            }
            None => pending.push(row),
        }
    }
    if !pending.is_empty() {
        out.push(Segment::Turn(pending));
    }
    out
}

/// The answer to `/files`: the files of the agent's workspace.
pub fn list_files(workspace: &std::path::Path) -> String {
    match crate::tools::list_workspace(workspace) {
        Ok(list) if list == "no files match" => "The workspace is empty.".into(),
        Ok(list) => format!("Files in the workspace:\n{list}"),
        Err(e) => format!("Cannot list the workspace: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferroclaw_mailbox::content::ChatIn;
    use ferroclaw_mailbox::{Destination, Origin};

    fn row(seq: i64, text: &str) -> InboundRow {
        InboundRow {
            seq,
            id: format!("m{seq}"),
            created_at: 0,
            process_after: None,
            origin: Origin {
                channel: "api".into(),
                conversation: "c".into(),
                sender: "ann".into(),
                reply_to: Destination::Api {
                    conversation: "c".into(),
                },
            },
            content: InboundContent::Chat(ChatIn {
                text: text.into(),
                sender: "ann".into(),
                attachments: vec![],
            }),
            trace: None,
        }
    }

    #[test]
    fn commands_split_turns_in_order() {
        let rows = [
            row(2, "hi"),
            row(4, "there"),
            row(6, "/cost"),
            row(8, "/clearly not"),
        ];
        let refs: Vec<&InboundRow> = rows.iter().collect();
        let got = segments(&refs);
        assert_eq!(got.len(), 3);
        assert!(matches!(&got[0], Segment::Turn(t) if t.len() == 2));
        assert!(matches!(&got[1], Segment::Command(Command::Cost, r) if r.seq == 6));
        assert!(matches!(&got[2], Segment::Turn(t) if t[0].seq == 8));
    }
}
