//! The command gate: `/commands` in chat messages are sorted before anything reaches an
//! agent. Admin commands need an admin; filtered commands are answered here and never reach
//! the model; any other `/command` goes to the agent like a message.

use ferroclaw_common::Config;

/// Session commands that change or reveal the agent's state: admins only.
pub const ADMIN_COMMANDS: &[&str] = &["/clear", "/compact", "/context", "/cost", "/files"];
/// Commands of the Claude Code CLI that make no sense through a chat: never forwarded.
pub const FILTERED_COMMANDS: &[&str] = &["/help", "/login", "/logout", "/doctor", "/config"];

/// What to do with a chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// Enqueue it for the agent.
    Pass,
    /// Answer it at once with this text; the agent never sees it.
    Answer(String),
    /// Refuse it with this one-line reason.
    Deny(String),
}

/// Sorts `text` from `sender`, addressed to `agent`.
pub fn check(config: &Config, agent: &str, sender: &str, text: &str) -> Gate {
    check_as(config, agent, sender, sender, text)
}

/// As [`check`], naming the sender `shown_as` in answers (on Discord a mention, `<@id>`).
pub fn check_as(config: &Config, agent: &str, sender: &str, shown_as: &str, text: &str) -> Gate {
    let Some(command) = text
        .split_whitespace()
        .next()
        .filter(|w| w.starts_with('/'))
    else {
        return Gate::Pass;
    };
    if FILTERED_COMMANDS.contains(&command) {
        return Gate::Answer(match command {
            "/help" => format!(
                "Talk to me in plain words. Commands: {} (admins only). Anything else starting with / goes to the agent.",
                ADMIN_COMMANDS.join(", ")
            ),
            other => format!(
                "{other} is not available here: an operator manages ferroclaw's configuration and logins."
            ),
        });
    }
    if ADMIN_COMMANDS.contains(&command) && !config.is_admin(agent, sender) {
        let who = if sender.is_empty() { "you" } else { shown_as };
        return Gate::Deny(format!(
            "{command} is for admins only, and {who} is not one."
        ));
    }
    Gate::Pass
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_filtered_and_other_commands() {
        let open = Config::default();
        assert_eq!(
            check(&open, "main", "ann", "/clear"),
            Gate::Pass,
            "no roles: everyone is admin"
        );
        assert_eq!(check(&open, "main", "ann", "hello /clear"), Gate::Pass);

        let config = Config::parse(
            "[roles]\nowners = [\"olga\"]\nadmins = [\"adam\"]\n[[agents]]\nname = \"main\"\nadmins = [\"mia\"]\n[[agents]]\nname = \"other\"\n",
        )
        .unwrap();
        config.validate().unwrap();
        for admin in ["olga", "adam", "mia"] {
            assert_eq!(
                check(&config, "main", admin, "/compact now"),
                Gate::Pass,
                "{admin}"
            );
        }
        assert!(
            matches!(check(&config, "other", "mia", "/cost"), Gate::Deny(_)),
            "mia admins main only"
        );
        let Gate::Deny(why) = check(&config, "main", "bob", "/clear") else {
            panic!("bob is no admin");
        };
        assert_eq!(why, "/clear is for admins only, and bob is not one.");
        let Gate::Deny(why) = check_as(&config, "main", "1504", "<@1504>", "/clear") else {
            panic!("1504 is no admin");
        };
        assert_eq!(why, "/clear is for admins only, and <@1504> is not one.");
        assert!(
            matches!(check(&config, "main", "bob", "/help"), Gate::Answer(a) if a.contains("/compact"))
        );
        assert!(
            matches!(check(&config, "main", "olga", "/login"), Gate::Answer(a) if a.contains("not available"))
        );
        assert_eq!(check(&config, "main", "bob", "/deploy staging"), Gate::Pass);
    }
}
