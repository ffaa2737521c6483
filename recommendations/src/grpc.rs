//! The gRPC adapter: checks each request's fields, turns them into domain values, asks the
//! catalog, and turns the answer back into wire types; and the injected faults
//! (`ARTIFICIAL_DELAY_MS`, `FAILURE_RATE`) applied on the way.

use std::{sync::Arc, time::Duration};

use bookstore_proto::{
    BookCategory, BookRecommendation, RecommendationRequest, RecommendationResponse,
    recommendations_server::Recommendations,
};
use tonic::{Request, Response, Status};

use crate::{
    catalog::{Catalog, Category, CategoryNotFound, MaxResults},
    config::FailureRate,
    error::Error,
};

/// The `Recommendations` service.
#[derive(Debug, Clone)]
pub struct RecommendationsService {
    catalog: Arc<Catalog>,
    faults: Faults,
}

/// Faults to inject, for demonstrating deadlines, retries and degradation. None by default.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Every answer waits this long first.
    pub delay: Duration,
    /// This fraction of calls is answered UNAVAILABLE.
    pub failure_rate: FailureRate,
}

impl RecommendationsService {
    /// Serves `catalog`, with `faults` injected (none in production).
    pub fn new(catalog: Arc<Catalog>, faults: Faults) -> Self {
        RecommendationsService { catalog, faults }
    }
}

/// A request whose every field has been checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Query {
    category: Category,
    max_results: MaxResults,
}

impl TryFrom<&RecommendationRequest> for Query {
    type Error = Error;

    fn try_from(req: &RecommendationRequest) -> Result<Self, Error> {
        // `user_id` does not change the answer (as in the original), but a negative id is a
        // caller bug worth reporting rather than passing on.
        if req.user_id < 0 {
            return Err(Error::InvalidArgument {
                field: "user_id",
                reason: format!("must not be negative, got {}", req.user_id),
            });
        }
        let max_results =
            MaxResults::try_from(req.max_results).map_err(|e| Error::InvalidArgument {
                field: "max_results",
                reason: e.to_string(),
            })?;
        // proto3 enums are open: any integer arrives. An unknown one is a category we do not
        // have, which the original answers with NOT_FOUND.
        let category = match BookCategory::try_from(req.category) {
            Ok(BookCategory::Mystery) => Category::Mystery,
            Ok(BookCategory::ScienceFiction) => Category::ScienceFiction,
            Ok(BookCategory::SelfHelp) => Category::SelfHelp,
            Err(_) => return Err(Error::CategoryNotFound),
        };
        Ok(Query {
            category,
            max_results,
        })
    }
}

impl From<CategoryNotFound> for Error {
    fn from(_: CategoryNotFound) -> Self {
        Error::CategoryNotFound
    }
}

#[tonic::async_trait]
impl Recommendations for RecommendationsService {
    async fn recommend(
        &self,
        request: Request<RecommendationRequest>,
    ) -> Result<Response<RecommendationResponse>, Status> {
        let query = Query::try_from(request.get_ref())?;
        if !self.faults.delay.is_zero() {
            // A timer, not a blocking sleep: other calls keep running meanwhile.
            tokio::time::sleep(self.faults.delay).await;
        }
        if self.faults.failure_rate.strikes(&mut rand::rng()) {
            return Err(Status::unavailable("injected failure (FAILURE_RATE)"));
        }
        let books = self
            .catalog
            .recommend(query.category, query.max_results, &mut rand::rng())
            .map_err(Error::from)?;
        let recommendations = books
            .into_iter()
            .map(|b| BookRecommendation {
                id: b.id,
                title: b.title,
            })
            .collect();
        Ok(Response::new(RecommendationResponse { recommendations }))
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    fn request(user_id: i32, category: i32, max_results: i32) -> Request<RecommendationRequest> {
        Request::new(RecommendationRequest {
            user_id,
            category,
            max_results,
        })
    }

    fn service() -> RecommendationsService {
        RecommendationsService::new(Arc::new(Catalog::builtin()), Faults::default())
    }

    #[tokio::test]
    async fn the_originals_unit_test_one_mystery_book() {
        let reply = service()
            .recommend(request(1, BookCategory::Mystery as i32, 1))
            .await
            .expect("ok")
            .into_inner();
        assert_eq!(reply.recommendations.len(), 1);
        assert!((1..=3).contains(&reply.recommendations[0].id));
    }

    #[tokio::test]
    async fn every_invalid_field_is_named() {
        let cases = [
            (
                request(1, 0, -1),
                Code::InvalidArgument,
                "max_results must be between 0 and 1000, got -1",
            ),
            (
                request(1, 0, 1001),
                Code::InvalidArgument,
                "max_results must be between 0 and 1000, got 1001",
            ),
            (
                request(-3, 0, 1),
                Code::InvalidArgument,
                "user_id must not be negative, got -3",
            ),
            (request(1, 3, 1), Code::NotFound, "Category not found"),
            (request(1, -1, 1), Code::NotFound, "Category not found"),
        ];
        for (req, code, message) in cases {
            let status = service().recommend(req).await.expect_err("must fail");
            assert_eq!((status.code(), status.message()), (code, message));
        }
    }

    proptest::proptest! {
        /// Any request at all: OK within bounds, NOT_FOUND or INVALID_ARGUMENT; never a panic,
        /// never another code.
        #[test]
        fn every_request_gets_one_of_three_answers(
            user_id: i32,
            category in proptest::prop_oneof![-2i32..5, proptest::num::i32::ANY],
            max_results: i32,
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime");
            let answer = runtime.block_on(service().recommend(request(user_id, category, max_results)));
            match answer {
                Ok(reply) => {
                    let books = reply.into_inner().recommendations;
                    proptest::prop_assert!(books.len() <= max_results as usize);
                    let ids: std::collections::HashSet<i32> = books.iter().map(|b| b.id).collect();
                    proptest::prop_assert_eq!(ids.len(), books.len());
                }
                Err(status) => proptest::prop_assert!(
                    matches!(status.code(), Code::NotFound | Code::InvalidArgument),
                    "unexpected {:?}", status
                ),
            }
        }
    }

    #[tokio::test]
    async fn zero_max_results_is_an_empty_list() {
        let reply = service()
            .recommend(request(1, BookCategory::SelfHelp as i32, 0))
            .await
            .expect("ok");
        assert!(reply.get_ref().recommendations.is_empty());
    }
}
