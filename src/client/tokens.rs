//! `setpoint tokens …`: API tokens, written to the database directly.

use std::time::Duration;

use clap::Subcommand;
use sqlx::PgPool;

use crate::api::auth::create_token_for_kinds;
use crate::cli::DbArgs;
use crate::store::StoreError;
use crate::store::tokens::{token_revoke, tokens_list};

use super::{ClientError, json_error};

/// `setpoint tokens …`.
#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    /// Create an API token for a tenant and print it (once; only its hash is stored).
    Create {
        /// Database.
        #[command(flatten)]
        db: DbArgs,
        /// The tenant (a DNS label).
        #[arg(long)]
        tenant: String,
        /// May use the operators' WorkService.
        #[arg(long)]
        admin: bool,
        /// Lifetime, e.g. 12h, 30d (default: no expiry).
        #[arg(long, value_parser = parse_lifetime)]
        expires_in: Option<Duration>,
        /// Limit the token to these kinds of resources: glob patterns of kind names, comma
        /// separated (e.g. `dns.*`). Default: every kind.
        #[arg(long, value_delimiter = ',')]
        kinds: Option<Vec<String>>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List tokens: id, tenant, admin, created, expires, revoked (never the token itself).
    List {
        /// Database.
        #[command(flatten)]
        db: DbArgs,
        /// Only this tenant's tokens.
        #[arg(long)]
        tenant: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by its id (see `tokens list`).
    ///
    /// Servers refuse it within 5 seconds (they trust a checked token that long). Revoking
    /// twice is harmless: the first revocation time stays.
    Revoke {
        /// Database.
        #[command(flatten)]
        db: DbArgs,
        /// The token's id.
        id: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

impl TokensCommand {
    /// The database flags.
    pub fn db(&self) -> &DbArgs {
        match self {
            TokensCommand::Create { db, .. }
            | TokensCommand::List { db, .. }
            | TokensCommand::Revoke { db, .. } => db,
        }
    }
}

/// A lifetime: `30d`, `12h`, `90m`, `45s`.
///
/// # Errors
/// For anything else.
pub fn parse_lifetime(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?}: write e.g. 30d, 12h, 90m"))?;
    let secs = match unit {
        "d" => n * 86_400,
        "h" => n * 3_600,
        "m" => n * 60,
        "s" | "" => n,
        _ => return Err(format!("{text:?}: unit must be d, h, m or s")),
    };
    Ok(Duration::from_secs(secs))
}

/// Runs `setpoint tokens …` on `pool`.
///
/// # Errors
/// Bad tenant names, database errors.
pub async fn run_tokens(pool: &PgPool, cmd: TokensCommand) -> Result<(), ClientError> {
    match cmd {
        TokensCommand::Create {
            tenant,
            admin,
            expires_in,
            kinds,
            json,
            ..
        } => {
            let t = create_token_for_kinds(pool, &tenant, admin, expires_in, kinds).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "token": t.token, "id": t.id, "tenant": t.tenant, "admin": t.admin,
                        "expires_at": t.expires_at, "kinds": t.kinds,
                    })
                );
            } else {
                println!("{}", t.token);
                eprintln!(
                    "token {} for tenant {}{}{}{} — shown once; store it now (only its hash is \
                     kept)",
                    t.id,
                    t.tenant,
                    if t.admin { " (admin)" } else { "" },
                    t.kinds
                        .as_ref()
                        .map(|k| format!(", kinds {}", k.join(",")))
                        .unwrap_or_default(),
                    t.expires_at
                        .map(|e| format!(", expires {}", e.to_rfc3339()))
                        .unwrap_or_default()
                );
            }
            Ok(())
        }
        TokensCommand::List { tenant, json, .. } => {
            let mut conn = pool.acquire().await.map_err(StoreError::from)?;
            let tokens = tokens_list(&mut conn, tenant.as_deref()).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&tokens).map_err(json_error)?
                );
                return Ok(());
            }
            println!(
                "{:>6}  {:<24} {:<5}  {:<20}  {:<20}  {:<20}  KINDS",
                "ID", "TENANT", "ADMIN", "CREATED", "EXPIRES", "REVOKED"
            );
            let when = |t: Option<chrono::DateTime<chrono::Utc>>| {
                t.map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                    .unwrap_or_else(|| "-".into())
            };
            for t in &tokens {
                println!(
                    "{:>6}  {:<24} {:<5}  {:<20}  {:<20}  {:<20}  {}",
                    t.id,
                    t.tenant,
                    if t.admin { "yes" } else { "no" },
                    when(Some(t.created_at)),
                    when(t.expires_at),
                    when(t.revoked_at),
                    t.kinds
                        .as_ref()
                        .map_or_else(|| "*".to_owned(), |k| k.join(",")),
                );
            }
            Ok(())
        }
        TokensCommand::Revoke { id, json, .. } => {
            let mut conn = pool.acquire().await.map_err(StoreError::from)?;
            let Some(t) = token_revoke(&mut conn, id).await? else {
                return Err(ClientError::Usage(format!(
                    "no token with id {id} (setpoint tokens list shows the ids)"
                )));
            };
            tracing::info!(token_id = t.id, tenant = %t.tenant, "API token revoked");
            if json {
                println!("{}", serde_json::to_string_pretty(&t).map_err(json_error)?);
            } else {
                println!(
                    "token {} of tenant {} revoked at {}; servers refuse it within {} s",
                    t.id,
                    t.tenant,
                    t.revoked_at.map(|r| r.to_rfc3339()).unwrap_or_default(),
                    crate::api::auth::CACHE_TTL.as_secs()
                );
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes() {
        assert_eq!(
            parse_lifetime("30d").unwrap(),
            Duration::from_secs(30 * 86_400)
        );
        assert_eq!(
            parse_lifetime("12h").unwrap(),
            Duration::from_secs(12 * 3_600)
        );
        assert!(parse_lifetime("3w").is_err());
    }
}
