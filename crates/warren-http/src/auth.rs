//! Basic authentication against the broker's users, and what each user tag may do
//! (RabbitMQ's `administrator` > `monitoring` > `management`; other users get 401).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRef, FromRequestParts};
use axum::http::request::Parts;
use base64::Engine;
use warren_core::{Access, Broker, ResourceKind, VHost};

use crate::error::ApiError;
use crate::AppState;

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    pub tags: Vec<String>,
}

impl Caller {
    pub fn has_tag(&self, t: &str) -> bool {
        self.tags.iter().any(|x| x == t)
    }

    pub fn is_admin(&self) -> bool {
        self.has_tag("administrator")
    }

    /// Sees every connection, channel and vhost name, and node data (RabbitMQ's
    /// `monitoring` and `administrator`); a vhost's objects need access to it all the same.
    pub fn is_monitor(&self) -> bool {
        self.is_admin() || self.has_tag("monitoring")
    }

    /// 401 unless administrator (users, permissions, vhost changes, definitions).
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::NotAuthorised("Not administrator user".into()))
        }
    }

    /// 401 unless policymaker or administrator (RabbitMQ's tags for `/api/policies`).
    pub fn require_policymaker(&self) -> Result<(), ApiError> {
        if self.is_admin() || self.has_tag("policymaker") {
            Ok(())
        } else {
            Err(ApiError::NotAuthorised("Not policymaker user".into()))
        }
    }

    pub fn require_monitor(&self) -> Result<(), ApiError> {
        if self.is_monitor() {
            Ok(())
        } else {
            Err(ApiError::NotAuthorised("Not monitor user".into()))
        }
    }

    /// Whether the caller may see objects of `vhost`: administrators everywhere, others
    /// (`monitoring` too, checked against RabbitMQ 3.10) where they have access.
    pub fn sees_vhost(&self, broker: &Broker, vhost: &str) -> bool {
        self.is_admin() || broker.check_vhost_access(&self.name, vhost).is_ok()
    }

    /// The vhosts whose objects the caller may list, sorted by name.
    pub fn visible_vhosts(&self, broker: &Broker) -> Vec<Arc<VHost>> {
        let mut v: Vec<Arc<VHost>> = broker
            .vhosts()
            .into_iter()
            .filter(|v| self.sees_vhost(broker, &v.name))
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The vhost of a path, if it exists and the caller may see it (else 404 / 401).
    pub fn vhost(&self, broker: &Broker, name: &str) -> Result<Arc<VHost>, ApiError> {
        let vh = broker.vhost(name).ok_or(ApiError::ObjectNotFound)?;
        if !self.sees_vhost(broker, name) {
            return Err(ApiError::NotAuthorised(format!(
                "access to vhost '{name}' refused for user '{}'",
                self.name
            )));
        }
        Ok(vh)
    }

    /// An operation on a resource needs the same permission as over AMQP (RabbitMQ's
    /// management plugin performs them as the user, even for administrators).
    pub fn check(
        &self,
        broker: &Broker,
        vhost: &str,
        access: Access,
        kind: ResourceKind,
        name: &str,
    ) -> Result<(), ApiError> {
        broker
            .check_vhost_access(&self.name, vhost)
            .map_err(ApiError::from)?;
        broker
            .check_permission(&self.name, vhost, access, kind, name)
            .map_err(ApiError::from)
    }
}

impl<S> FromRequestParts<S> for Caller
where
    S: Send + Sync,
    AppState: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let app = AppState::from_ref(state);
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip())
            .ok_or_else(|| ApiError::Internal("no peer address".into()))?;
        let challenge = !is_script_request(parts);
        let refused = |reason: &str| ApiError::LoginFailed {
            reason: reason.into(),
            challenge,
        };
        let (user, pass) = basic_credentials(parts).ok_or_else(|| refused("Not_Authorized"))?;
        let u = app.broker.authenticate(&user, &pass, peer).map_err(|e| {
            tracing::info!(%user, %peer, error = %e, "http login refused");
            refused("Not_Authorized")
        })?;
        let caller = Caller {
            name: u.name,
            tags: u.tags,
        };
        if !(caller.is_monitor() || caller.has_tag("management") || caller.has_tag("policymaker")) {
            tracing::info!(user = %caller.name, "http login refused: no management tag");
            return Err(refused("Not management user"));
        }
        Ok(caller)
    }
}

/// A request made by a page's script (`X-Requested-With: XMLHttpRequest`, the convention
/// jQuery and Spring use): it gets no `WWW-Authenticate` challenge, so a browser leaves
/// the login to the page instead of showing its own dialog.
fn is_script_request(parts: &Parts) -> bool {
    parts
        .headers
        .get("x-requested-with")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("XMLHttpRequest"))
}

/// `Authorization: Basic base64(user:pass)`; `None` when absent or malformed.
fn basic_credentials(parts: &Parts) -> Option<(String, String)> {
    let h = parts.headers.get(axum::http::header::AUTHORIZATION)?;
    let s = h.to_str().ok()?;
    let (scheme, rest) = s.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}
