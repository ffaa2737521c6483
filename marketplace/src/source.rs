//! Where recommendations come from: a trait the routes depend on, and its gRPC implementation
//! over one long-lived, lazily connected channel.

use std::{sync::RwLock, time::Duration};

use async_trait::async_trait;
use bookstore_proto::{
    BookCategory, RecommendationRequest, recommendations_client::RecommendationsClient,
};
use tonic::{Code, transport::Channel};

use crate::books::{Book, Category, RecommendationQuery};

/// Why no recommendations could be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// The service has no books in that category.
    #[error("no books in this category")]
    NoBooks,
    /// No answer within the deadline.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The service is down, unreachable, refused us, or failed. The text is for logs only.
    #[error("recommendations service failed: {0}")]
    Unavailable(String),
}

/// Something that recommends books. The routes hold an `Arc<dyn RecommendationSource>`, so
/// tests can stand in for the real service.
#[async_trait]
pub trait RecommendationSource: Send + Sync + 'static {
    async fn recommend(&self, query: &RecommendationQuery) -> Result<Vec<Book>, SourceError>;
}

/// The recommendations service over gRPC.
#[derive(Debug)]
pub struct GrpcSource {
    client: RwLock<RecommendationsClient<Channel>>,
    timeout: Duration,
}

impl GrpcSource {
    /// Calls through `channel` (cloning it shares the one connection); every call carries and
    /// enforces the `timeout` deadline.
    pub fn new(channel: Channel, timeout: Duration) -> Self {
        GrpcSource {
            client: RwLock::new(RecommendationsClient::new(channel)),
            timeout,
        }
    }

    /// Sends new calls through `channel` from now on (after a certificate rotation). Calls in
    /// flight finish on the old connection, which closes once the last of them is done.
    pub fn replace_channel(&self, channel: Channel) {
        *self.client.write().unwrap_or_else(|p| p.into_inner()) =
            RecommendationsClient::new(channel);
    }

    fn client(&self) -> RecommendationsClient<Channel> {
        // Cloned out, so the lock is never held across an await.
        self.client
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn to_proto(category: Category) -> BookCategory {
    match category {
        Category::Mystery => BookCategory::Mystery,
        Category::ScienceFiction => BookCategory::ScienceFiction,
        Category::SelfHelp => BookCategory::SelfHelp,
    }
}

#[async_trait]
impl RecommendationSource for GrpcSource {
    async fn recommend(&self, query: &RecommendationQuery) -> Result<Vec<Book>, SourceError> {
        let mut request = tonic::Request::new(RecommendationRequest {
            user_id: query.user_id,
            category: to_proto(query.category) as i32,
            max_results: query.max_results,
        });
        // Sent as `grpc-timeout`, so the server can give up too; the local timeout below is the
        // guarantee, covering connection set-up as well.
        request.set_timeout(self.timeout);
        let mut client = self.client();
        let reply = tokio::time::timeout(self.timeout, client.recommend(request)).await;
        let result = match reply {
            Err(_) => Err(SourceError::Timeout(self.timeout)),
            Ok(Err(status)) if status.code() == Code::NotFound => Err(SourceError::NoBooks),
            Ok(Err(status))
                if status.code() == Code::Cancelled && status.message().contains("Timeout") =>
            {
                Err(SourceError::Timeout(self.timeout))
            }
            Ok(Err(status)) => Err(SourceError::Unavailable(format!(
                "{:?}: {}",
                status.code(),
                status.message()
            ))),
            Ok(Ok(reply)) => Ok(reply
                .into_inner()
                .recommendations
                .into_iter()
                .map(|b| Book {
                    id: b.id,
                    title: b.title,
                })
                .collect()),
        };
        if let Err(e @ (SourceError::Timeout(_) | SourceError::Unavailable(_))) = &result {
            tracing::warn!(error = %e, category = query.category.slug(), "Recommend call failed");
        }
        result
    }
}
