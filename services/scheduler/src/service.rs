//! The `Scheduler` gRPC service.

use ferroclaw_proto::v1::scheduler_server::Scheduler;
use ferroclaw_proto::v1::{ListTasksRequest, ListTasksResponse};
use tonic::{Request, Response, Status};

use crate::store::TaskStore;

pub struct SchedulerService {
    pub(crate) store: TaskStore,
}

#[tonic::async_trait]
impl Scheduler for SchedulerService {
    async fn list_tasks(
        &self,
        request: Request<ListTasksRequest>,
    ) -> Result<Response<ListTasksResponse>, Status> {
        let session = request.into_inner().session_id;
        let tasks = self
            .store
            .list((!session.is_empty()).then_some(session.as_str()))
            .await?;
        Ok(Response::new(ListTasksResponse { tasks }))
    }
}
