//! Blobstore providers. See the crate documentation.

/// A configured blobstore.
#[derive(Debug, Clone)]
pub enum Provider {
    Placeholder,
}

/// Why a provider cannot be configured or reached.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("placeholder")]
    Placeholder,
}
