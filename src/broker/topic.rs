//! Topic names, topic filters and the subscription trie that matches one against the other.

use std::collections::HashMap;

use super::codec::QoS;

/// Why a topic filter is refused (answered with SUBACK 0x80).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("a topic filter must not be empty")]
    Empty,
    #[error("'#' must be the last level, alone in its level")]
    MisplacedHash,
    #[error("'+' must occupy a whole level")]
    MisplacedPlus,
    #[error("a topic filter must not contain U+0000")]
    Nul,
}

/// Checks a subscription filter [MQTT-4.7.1-1..3].
pub fn validate_filter(filter: &str) -> Result<(), FilterError> {
    if filter.is_empty() {
        return Err(FilterError::Empty);
    }
    if filter.contains('\0') {
        return Err(FilterError::Nul);
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(FilterError::MisplacedHash);
        }
        if level.contains('+') && level != "+" {
            return Err(FilterError::MisplacedPlus);
        }
    }
    Ok(())
}

/// Checks a topic name a message is published to: non-empty, no wildcards [MQTT-4.7.3-1, 3.3.2-2].
pub fn validate_topic(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// Whether `filter` (already valid) matches `topic` (already valid).
pub fn matches(filter: &str, topic: &str) -> bool {
    // [MQTT-4.7.2-1]: wildcards at the first level do not match topics starting with '$'.
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Subscriptions by filter level: matching walks only the branches a topic can reach.
#[derive(Debug, Default)]
pub struct SubscriptionTrie<K> {
    root: Node<K>,
}

#[derive(Debug)]
struct Node<K> {
    children: HashMap<Box<str>, Node<K>>,
    plus: Option<Box<Node<K>>>,
    /// Subscribers whose filter ends at this node.
    exact: Vec<(K, QoS)>,
    /// Subscribers whose filter is this node's path followed by `/#`.
    hash: Vec<(K, QoS)>,
}

impl<K> Default for Node<K> {
    fn default() -> Self {
        Node {
            children: HashMap::new(),
            plus: None,
            exact: Vec::new(),
            hash: Vec::new(),
        }
    }
}

impl<K> Node<K> {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.exact.is_empty()
            && self.hash.is_empty()
    }
}

impl<K: Copy + Eq> SubscriptionTrie<K> {
    pub fn new() -> Self {
        SubscriptionTrie {
            root: Node::default(),
        }
    }

    /// Adds or updates `key`'s subscription to a valid `filter`.
    pub fn insert(&mut self, filter: &str, key: K, qos: QoS) {
        let mut node = &mut self.root;
        let mut levels = filter.split('/').peekable();
        while let Some(level) = levels.next() {
            if level == "#" {
                upsert(&mut node.hash, key, qos);
                return;
            }
            node = if level == "+" {
                node.plus.get_or_insert_with(Box::default)
            } else {
                node.children.entry(level.into()).or_default()
            };
            if levels.peek().is_none() {
                upsert(&mut node.exact, key, qos);
            }
        }
    }

    /// Removes `key`'s subscription to `filter`; true if there was one.
    pub fn remove(&mut self, filter: &str, key: K) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        remove_at(&mut self.root, &levels, key)
    }

    /// Appends every (key, qos) whose filter matches `topic` to `out` (a key may appear more
    /// than once when its filters overlap).
    pub fn matches(&self, topic: &str, out: &mut Vec<(K, QoS)>) {
        let dollar = topic.starts_with('$');
        let mut levels = topic.split('/');
        let Some(first) = levels.next() else { return };
        let rest: Vec<&str> = levels.collect();
        let root = &self.root;
        if !dollar {
            out.extend_from_slice(&root.hash);
            if let Some(plus) = &root.plus {
                collect(plus, &rest, out);
            }
        }
        if let Some(child) = root.children.get(first) {
            collect(child, &rest, out);
        }
    }
}

fn upsert<K: Copy + Eq>(list: &mut Vec<(K, QoS)>, key: K, qos: QoS) {
    match list.iter_mut().find(|(k, _)| *k == key) {
        Some(entry) => entry.1 = qos,
        None => list.push((key, qos)),
    }
}

/// `node` has matched the levels before `rest`.
fn collect<K: Copy>(node: &Node<K>, rest: &[&str], out: &mut Vec<(K, QoS)>) {
    // "a/#" also matches "a" itself [MQTT-4.7.1-2].
    out.extend_from_slice(&node.hash);
    let Some((level, rest)) = rest.split_first() else {
        out.extend_from_slice(&node.exact);
        return;
    };
    if let Some(plus) = &node.plus {
        collect(plus, rest, out);
    }
    if let Some(child) = node.children.get(*level) {
        collect(child, rest, out);
    }
}

fn remove_at<K: Copy + Eq>(node: &mut Node<K>, levels: &[&str], key: K) -> bool {
    let Some((level, rest)) = levels.split_first() else {
        return false;
    };
    if *level == "#" {
        return remove_key(&mut node.hash, key);
    }
    let removed;
    if *level == "+" {
        let Some(child) = node.plus.as_deref_mut() else {
            return false;
        };
        removed = if rest.is_empty() {
            remove_key(&mut child.exact, key)
        } else {
            remove_at(child, rest, key)
        };
        if child.is_empty() {
            node.plus = None;
        }
    } else {
        let Some(child) = node.children.get_mut(*level) else {
            return false;
        };
        removed = if rest.is_empty() {
            remove_key(&mut child.exact, key)
        } else {
            remove_at(child, rest, key)
        };
        if child.is_empty() {
            node.children.remove(*level);
        }
    }
    removed
}

fn remove_key<K: Eq>(list: &mut Vec<(K, QoS)>, key: K) -> bool {
    let before = list.len();
    list.retain(|(k, _)| *k != key);
    list.len() != before
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matched(trie: &SubscriptionTrie<u32>, topic: &str) -> Vec<u32> {
        let mut out = Vec::new();
        trie.matches(topic, &mut out);
        let mut keys: Vec<u32> = out.into_iter().map(|(k, _)| k).collect();
        keys.sort();
        keys
    }

    #[test]
    fn filters_are_validated_per_the_standard() {
        for ok in [
            "#",
            "+",
            "a/#",
            "a/+/b",
            "+/+",
            "/",
            "a//b",
            "$SYS/#",
            "sport/tennis/#",
        ] {
            assert_eq!(validate_filter(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_filter(""), Err(FilterError::Empty));
        assert_eq!(validate_filter("a/#/b"), Err(FilterError::MisplacedHash));
        assert_eq!(validate_filter("a#"), Err(FilterError::MisplacedHash));
        assert_eq!(validate_filter("a+"), Err(FilterError::MisplacedPlus));
        assert_eq!(validate_filter("a/+b/c"), Err(FilterError::MisplacedPlus));
    }

    #[test]
    fn matching_follows_the_standards_examples() {
        assert!(matches("sport/tennis/player1/#", "sport/tennis/player1"));
        assert!(matches(
            "sport/tennis/player1/#",
            "sport/tennis/player1/score/wimbledon"
        ));
        assert!(matches("sport/#", "sport"));
        assert!(matches("sport/tennis/+", "sport/tennis/player1"));
        assert!(!matches("sport/tennis/+", "sport/tennis/player1/ranking"));
        assert!(!matches("sport/+", "sport"));
        assert!(matches("sport/+", "sport/"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
        assert!(!matches("#", "$SYS/broker/uptime"));
        assert!(!matches("+/broker/uptime", "$SYS/broker/uptime"));
        assert!(matches("$SYS/#", "$SYS/broker/uptime"));
    }

    #[test]
    fn the_trie_agrees_with_the_plain_matcher() {
        let filters = [
            "#", "+", "a/#", "a/+", "a/b", "+/b", "a/+/c", "$SYS/#", "+/+/+", "a/b/#", "/+",
        ];
        let topics = [
            "a", "a/b", "a/b/c", "b", "b/b", "$SYS/x", "a/x/c", "/a", "/", "a/",
        ];
        let mut trie = SubscriptionTrie::new();
        for (i, f) in filters.iter().enumerate() {
            trie.insert(f, i as u32, QoS::AtMostOnce);
        }
        for t in topics {
            let want: Vec<u32> = (0..filters.len() as u32)
                .filter(|&i| matches(filters[i as usize], t))
                .collect();
            assert_eq!(matched(&trie, t), want, "topic {t}");
        }
    }

    #[test]
    fn removing_a_subscription_stops_matching_and_prunes_nodes() {
        let mut trie = SubscriptionTrie::new();
        trie.insert("a/+/c", 1u32, QoS::AtLeastOnce);
        trie.insert("a/#", 2, QoS::AtLeastOnce);
        assert_eq!(matched(&trie, "a/b/c"), vec![1, 2]);
        assert!(trie.remove("a/+/c", 1));
        assert!(!trie.remove("a/+/c", 1));
        assert_eq!(matched(&trie, "a/b/c"), vec![2]);
        assert!(trie.remove("a/#", 2));
        assert!(trie.root.is_empty());
    }

    #[test]
    fn resubscribing_replaces_the_qos() {
        let mut trie = SubscriptionTrie::new();
        trie.insert("a", 1u32, QoS::AtMostOnce);
        trie.insert("a", 1, QoS::ExactlyOnce);
        let mut out = Vec::new();
        trie.matches("a", &mut out);
        assert_eq!(out, vec![(1, QoS::ExactlyOnce)]);
    }
}
