//! The registry: toolkit name → [`ToolKitClient`], as a value and as the
//! process-global one behind [`register_client`] and [`get_client`].

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, LazyLock, PoisonError, RwLock},
};

use crate::{client::ToolKitClient, error::RegistryError, tool::is_valid_toolkit_name};

/// A map from toolkit name to [`ToolKitClient`] — the counterpart of the
/// Python `django_atp.registry` / `fastapi_atp.registry` modules, as a
/// value type.
///
/// It is a cheap handle (clones share the same map). Reads are concurrent;
/// registering while requests are served is safe.
///
/// ```
/// use atp_registry::{Registry, ToolKitClient};
///
/// let registry = Registry::new();
/// registry.register_client("crm", ToolKitClient::new("key", "CRM")).unwrap();
/// assert_eq!(registry.get_client("crm").unwrap().app_name(), "CRM");
/// assert!(registry.get_client("nope").is_none());
/// ```
#[derive(Clone, Default)]
pub struct Registry {
    inner: Arc<RwLock<HashMap<Box<str>, ToolKitClient>>>,
}

static GLOBAL: LazyLock<Registry> = LazyLock::new(Registry::new);

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The process-global registry that [`register_client`] fills.
    pub fn global() -> &'static Registry {
        &GLOBAL
    }

    /// Registers `client` under `name` (the toolkit's name in URLs:
    /// 1–128 characters from `A-Z a-z 0-9 _ - .`). A name that is taken is
    /// refused, not overwritten; use [`Registry::unregister_client`] first
    /// to replace a toolkit.
    pub fn register_client(
        &self,
        name: impl Into<String>,
        client: ToolKitClient,
    ) -> Result<(), RegistryError> {
        let name = name.into();
        if !is_valid_toolkit_name(&name) {
            return Err(RegistryError::InvalidToolkitName(name));
        }
        let mut map = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        if map.contains_key(name.as_str()) {
            return Err(RegistryError::DuplicateToolkit(name));
        }
        tracing::debug!(toolkit = %name, app = client.app_name(), "toolkit registered");
        map.insert(name.into_boxed_str(), client);
        Ok(())
    }

    /// Removes a toolkit, returning it.
    pub fn unregister_client(&self, name: &str) -> Option<ToolKitClient> {
        self.inner
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name)
    }

    /// The toolkit registered under `name`.
    pub fn get_client(&self, name: &str) -> Option<ToolKitClient> {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    /// Every toolkit, sorted by name.
    pub fn list_clients(&self) -> Vec<(String, ToolKitClient)> {
        let map = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        let mut all: Vec<(String, ToolKitClient)> = map
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        drop(map);
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// How many toolkits are registered.
    pub fn len(&self) -> usize {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether no toolkit is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<String> = self.list_clients().into_iter().map(|(n, _)| n).collect();
        f.debug_struct("Registry")
            .field("toolkits", &names)
            .finish()
    }
}

/// Registers `client` under `name` in the global registry (the Python SDK's
/// `register_client`).
pub fn register_client(
    name: impl Into<String>,
    client: ToolKitClient,
) -> Result<(), RegistryError> {
    Registry::global().register_client(name, client)
}

/// The toolkit registered under `name` in the global registry (the Python SDK's
/// `get_client`).
pub fn get_client(name: &str) -> Option<ToolKitClient> {
    Registry::global().get_client(name)
}

/// Every toolkit of the global registry, sorted by name.
pub fn list_clients() -> Vec<(String, ToolKitClient)> {
    Registry::global().list_clients()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_not_overwritten() {
        let r = Registry::new();
        assert!(matches!(
            r.register_client("bad name", ToolKitClient::new("k", "a")),
            Err(RegistryError::InvalidToolkitName(_))
        ));
        r.register_client("a.b-c_1", ToolKitClient::new("k", "first"))
            .expect("valid");
        assert!(matches!(
            r.register_client("a.b-c_1", ToolKitClient::new("k", "second")),
            Err(RegistryError::DuplicateToolkit(_))
        ));
        assert_eq!(
            r.get_client("a.b-c_1")
                .map(|c| c.app_name().to_owned())
                .as_deref(),
            Some("first")
        );
        assert!(r.unregister_client("a.b-c_1").is_some());
        assert!(r.is_empty());
    }

    #[test]
    fn listing_is_sorted() {
        let r = Registry::new();
        for n in ["zeta", "alpha", "mid"] {
            r.register_client(n, ToolKitClient::new("k", n))
                .expect("valid");
        }
        let names: Vec<String> = r.list_clients().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["alpha", "mid", "zeta"]);
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn global_functions() {
        register_client("global-test-kit", ToolKitClient::new("k", "G")).expect("valid");
        assert!(get_client("global-test-kit").is_some());
        assert!(list_clients().iter().any(|(n, _)| n == "global-test-kit"));
    }

    #[test]
    fn concurrent_reads_and_writes() {
        let r = Registry::new();
        std::thread::scope(|s| {
            for t in 0..4 {
                let r = r.clone();
                s.spawn(move || {
                    for i in 0..200 {
                        r.register_client(format!("t{t}-{i}"), ToolKitClient::new("k", "x"))
                            .expect("valid");
                        assert!(r.get_client(&format!("t{t}-{i}")).is_some());
                    }
                });
            }
        });
        assert_eq!(r.len(), 800);
    }
}
