//! Local stand-ins for the real peers, so setpoint runs on one machine with no cloud account,
//! and what the benchmarks read of the machine.

pub mod cpu;
pub mod postgres;
#[cfg(all(
    feature = "ec2",
    feature = "kubernetes",
    feature = "email",
    feature = "dns"
))]
pub mod stack;
pub mod testdb;

/// The secrets key of a local engine (an embedded database, `setpoint dev`), kept in
/// `dir/secrets.key` (made on first use, readable by its owner only): secret outputs stay
/// readable across restarts without a key to configure.
///
/// # Errors
/// When the file cannot be read or written, or holds no valid key.
pub fn local_secrets_key(dir: &std::path::Path) -> Result<crate::kinds::SecretBox, LocalKeyError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join("secrets.key");
    std::fs::create_dir_all(dir).map_err(|e| LocalKeyError::Io(path.clone(), e))?;
    let key = match std::fs::read_to_string(&path) {
        Ok(k) => k,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = crate::kinds::SecretBox::generate_key("local")?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| LocalKeyError::Io(path.clone(), e))?;
            f.write_all(key.as_bytes())
                .map_err(|e| LocalKeyError::Io(path.clone(), e))?;
            key
        }
        Err(e) => return Err(LocalKeyError::Io(path, e)),
    };
    Ok(crate::kinds::SecretBox::from_keys(key.trim())?)
}

/// Why a local secrets key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum LocalKeyError {
    /// The key file.
    #[error("{0}: {1}")]
    Io(std::path::PathBuf, std::io::Error),
    /// The key.
    #[error(transparent)]
    Key(#[from] crate::kinds::SecretsError),
}
