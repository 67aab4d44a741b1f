//! Turns [`NatsConfig`] into a connected `async_nats::Client`: server list, timeouts,
//! authentication (user/password, token, NKey seed, credentials file) and TLS.
//!
//! Secrets are read here, at start, and handed straight to the client; they never reach a
//! log line or an error message.

use std::path::Path;
use std::time::Duration;

use async_nats::{ConnectErrorKind, ConnectOptions, ServerAddr};
use secrecy::{ExposeSecret, SecretString};
use tracing::{info, warn};

use super::config::{NatsAuthConfig, NatsConfig};
use super::NatsError;
use crate::ErrorClass;

/// Connects with every option the config sets. The client reconnects by itself after an
/// outage, without limit; publishes fail (transient) while it is disconnected.
pub(crate) async fn connect(config: &NatsConfig) -> Result<async_nats::Client, NatsError> {
    let url = config.redacted_url();
    let servers = config
        .servers()
        .into_iter()
        .map(|s| s.parse::<ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| NatsError::BadUrl {
            url: url.clone(),
            message: e.to_string(),
        })?;

    let options = options(config).await?;
    let client = options
        .connect(servers)
        .await
        .map_err(|e| NatsError::Connect {
            url: url.clone(),
            class: match e.kind() {
                ConnectErrorKind::Authentication
                | ConnectErrorKind::AuthorizationViolation
                | ConnectErrorKind::Tls
                | ConnectErrorKind::ServerParse => ErrorClass::Permanent,
                _ => ErrorClass::Transient,
            },
            message: e.to_string(),
        })?;
    let server = client.server_info();
    info!(
        url = %url,
        server_version = %server.version,
        max_payload = server.max_payload,
        jetstream = config.jetstream,
        "connected to NATS"
    );
    Ok(client)
}

async fn options(config: &NatsConfig) -> Result<ConnectOptions, NatsError> {
    let mut options = ConnectOptions::new()
        .name(&config.client_name)
        .connection_timeout(Duration::from_millis(config.connect_timeout_ms))
        .request_timeout(Some(Duration::from_millis(config.publish_timeout_ms)))
        // At start a server must answer (a wrong URL is reported, not retried forever);
        // after that, outages are reconnected without limit.
        .max_reconnects(None::<usize>)
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected
                | async_nats::Event::Draining
                | async_nats::Event::Closed => info!(event = %event, "NATS connection"),
                _ => warn!(event = %event, "NATS connection"),
            }
        });

    if let Some(auth) = &config.auth {
        options = with_auth(options, auth).await?;
    }
    if let Some(tls) = &config.tls {
        options = options.require_tls(tls.required);
        if tls.handshake_first {
            options = options.tls_first();
        }
        if let Some(ca) = &tls.ca_file {
            check_readable("tls.ca_file", ca)?;
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
            check_readable("tls.cert_file", cert)?;
            check_readable("tls.key_file", key)?;
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
    }
    Ok(options)
}

/// Adds the one authentication method `auth` configures (validation made sure there is at
/// most one).
async fn with_auth(
    mut options: ConnectOptions,
    auth: &NatsAuthConfig,
) -> Result<ConnectOptions, NatsError> {
    if let Some(user) = &auth.user {
        let password = secret(
            "password",
            auth.password.as_ref(),
            auth.password_file.as_deref(),
        )
        .await?;
        if let Some(password) = password {
            options = options.user_and_password(user.clone(), password.expose_secret().into());
        }
    }
    if let Some(token) = secret("token", auth.token.as_ref(), auth.token_file.as_deref()).await? {
        options = options.token(token.expose_secret().into());
    }
    if let Some(seed) = secret(
        "nkey_seed",
        auth.nkey_seed.as_ref(),
        auth.nkey_seed_file.as_deref(),
    )
    .await?
    {
        options = options.nkey(seed.expose_secret().into());
    }
    if let Some(path) = &auth.credentials_file {
        options = options
            .credentials_file(path)
            .await
            .map_err(|source| NatsError::ReadFile {
                key: "auth.credentials_file",
                path: path.clone(),
                source,
            })?;
    }
    Ok(options)
}

/// The secret given inline or in a file (surrounding whitespace trimmed).
async fn secret(
    key: &'static str,
    inline: Option<&SecretString>,
    file: Option<&Path>,
) -> Result<Option<SecretString>, NatsError> {
    if let Some(value) = inline {
        return Ok(Some(value.clone()));
    }
    let Some(path) = file else {
        return Ok(None);
    };
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|source| NatsError::ReadFile {
            key: match key {
                "password" => "auth.password_file",
                "token" => "auth.token_file",
                _ => "auth.nkey_seed_file",
            },
            path: path.to_path_buf(),
            source,
        })?;
    Ok(Some(SecretString::from(text.trim().to_string())))
}

/// Gives a clear error for a missing certificate file before the TLS layer gives a vague one.
fn check_readable(key: &'static str, path: &Path) -> Result<(), NatsError> {
    std::fs::metadata(path)
        .map(|_| ())
        .map_err(|source| NatsError::ReadFile {
            key,
            path: path.to_path_buf(),
            source,
        })
}
