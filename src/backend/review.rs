//! TokenReview and SubjectAccessReview on kube-rs, for `auth.mode: kubernetes`. The client is the
//! backend's, so both reviews appear in `gateway_k8s_api_requests_total` (verb `create`,
//! resources `tokenreviews` and `subjectaccessreviews`).

use async_trait::async_trait;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::Client;
use kube::api::{Api, PostParams};

use crate::auth::{Reviewer, UserInfo};
use crate::backend::kubernetes::map_error;
use crate::cluster::ApiError;
use crate::config::AccessAttributes;

pub struct KubeReviewer {
    client: Client,
}

impl KubeReviewer {
    pub fn new(client: Client) -> Self {
        KubeReviewer { client }
    }
}

/// Whether a TokenReview answered for the audiences asked for: none asked, or at least one of
/// them among those the answer names.
pub fn audiences_match(asked: &[String], answered: &[String]) -> bool {
    asked.is_empty() || asked.iter().any(|a| answered.contains(a))
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

#[async_trait]
impl Reviewer for KubeReviewer {
    async fn review_token(&self, token: &str, audiences: &[String]) -> Result<Option<UserInfo>, ApiError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: (!audiences.is_empty()).then(|| audiences.to_vec()),
            },
            ..TokenReview::default()
        };
        let answered = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(map_error)?;
        let status = answered.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Ok(None);
        }
        // An authenticator that does not understand audiences may answer without checking them;
        // Kubernetes asks a client that sent audiences to check the answer's.
        if !audiences_match(audiences, status.audiences.as_deref().unwrap_or_default()) {
            return Ok(None);
        }
        let user = status.user.unwrap_or_default();
        Ok(Some(UserInfo {
            username: user.username.unwrap_or_default(),
            uid: user.uid.unwrap_or_default(),
            groups: user.groups.unwrap_or_default(),
            extra: user.extra.unwrap_or_default().into_iter().collect(),
        }))
    }

    async fn review_access(&self, user: &UserInfo, a: &AccessAttributes) -> Result<Result<(), String>, ApiError> {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: non_empty(&user.username),
                uid: non_empty(&user.uid),
                groups: (!user.groups.is_empty()).then(|| user.groups.clone()),
                extra: (!user.extra.is_empty()).then(|| user.extra.clone().into_iter().collect()),
                resource_attributes: Some(ResourceAttributes {
                    verb: non_empty(&a.verb),
                    group: Some(a.group.clone()),
                    resource: non_empty(&a.resource),
                    subresource: non_empty(&a.subresource),
                    name: non_empty(&a.name),
                    namespace: non_empty(&a.namespace),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let answered = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(map_error)?;
        let status = answered.status.unwrap_or_default();
        if status.allowed && status.denied != Some(true) {
            Ok(Ok(()))
        } else {
            let reason = status
                .reason
                .filter(|r| !r.is_empty())
                .or(status.evaluation_error)
                .unwrap_or_else(|| "no RBAC rule allows it".into());
            Ok(Err(reason))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::audiences_match;

    #[test]
    fn a_review_counts_only_for_the_audiences_it_names() {
        let ours = vec!["signal-gateway".to_owned()];
        assert!(audiences_match(&[], &[]), "no audience asked: the API server's");
        assert!(audiences_match(&ours, &["api".into(), "signal-gateway".into()]));
        assert!(!audiences_match(&ours, &[]), "an answer naming no audience");
        assert!(!audiences_match(&ours, &["https://kubernetes.default.svc".into()]));
    }
}
