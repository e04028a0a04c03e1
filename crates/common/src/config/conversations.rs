//! `[[conversations]]`: which agent answers an API conversation, by its id.

use serde::Deserialize;

use super::ConfigError;
use super::agents::{AgentConfig, check_agent};

/// API conversations whose id matches `pattern` → agent. `*` matches everything; `abc*`
/// matches ids starting with `abc`; anything else matches exactly.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConversationRoute {
    pub pattern: String,
    pub agent: String,
}

impl ConversationRoute {
    pub fn matches(&self, conversation: &str) -> bool {
        match self.pattern.strip_suffix('*') {
            Some(prefix) => conversation.starts_with(prefix),
            None => self.pattern == conversation,
        }
    }
}

/// Checks `[[conversations]]`: each must route to one of `agents`.
pub(super) fn validate(
    routes: &[ConversationRoute],
    agents: &[AgentConfig],
) -> Result<(), ConfigError> {
    for (i, route) in routes.iter().enumerate() {
        check_agent(agents, &format!("conversations[{i}].agent"), &route.agent)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::*;

    #[test]
    fn conversation_patterns() {
        let r = ConversationRoute {
            pattern: "ops-*".into(),
            agent: "a".into(),
        };
        assert!(r.matches("ops-1"));
        assert!(!r.matches("dev-1"));
    }

    #[test]
    fn routes_name_a_known_agent() {
        let c = Config::parse(
            "[[agents]]\nname = \"main\"\n[[conversations]]\npattern = \"x\"\nagent = \"b\"\n",
        )
        .unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("conversations[0].agent"), "{err}");
    }
}
