//! `[roles]`: the owners and admins, and who may use admin commands.

use serde::Deserialize;

use super::Config;

/// People by their sender id (an API message's `sender`, later a Discord user id).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Roles {
    pub owners: Vec<String>,
    pub admins: Vec<String>,
}

impl Config {
    /// Whether `sender` may use admin commands with `agent`. With no owner or admin named
    /// anywhere (a single-user setup), everyone may.
    pub fn is_admin(&self, agent: &str, sender: &str) -> bool {
        let agent_admins = self
            .agents
            .iter()
            .find(|a| a.name == agent)
            .map(|a| &a.admins);
        let nobody_named = self.roles.owners.is_empty()
            && self.roles.admins.is_empty()
            && self.agents.iter().all(|a| a.admins.is_empty());
        if nobody_named {
            return true;
        }
        let named = |list: &Vec<String>| list.iter().any(|s| s == sender);
        !sender.is_empty()
            && (named(&self.roles.owners)
                || named(&self.roles.admins)
                || agent_admins.is_some_and(named))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admins_are_global_or_per_agent_and_everyone_when_none_is_named() {
        let open = Config::default();
        assert!(open.is_admin("main", "anyone"));
        let c = Config::parse(
            "[roles]\nowners = [\"olga\"]\n[[agents]]\nname = \"main\"\nadmins = [\"mia\"]\n[[agents]]\nname = \"other\"\n",
        )
        .unwrap();
        assert!(c.is_admin("main", "olga") && c.is_admin("other", "olga"));
        assert!(c.is_admin("main", "mia") && !c.is_admin("other", "mia"));
        assert!(!c.is_admin("main", "bob") && !c.is_admin("main", ""));
    }
}
