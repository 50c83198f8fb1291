//! The handlers of the director's actions, one arm per [`Action`]: what each does once its
//! arguments are parsed. Families live in their own files: the agent's own state ([`state`]),
//! the jobs' lifecycle ([`jobs`]), deploying ([`deploy`]), `update_settings`
//! ([`update_settings`]) and the VM itself: disks, ssh, logs, DNS, ARP, power ([`vm`]).

pub mod deploy;
pub mod jobs;
pub mod state;
pub mod update_settings;
pub mod vm;

use std::sync::Arc;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::Context;
use super::action::Action;
use super::tasks::TaskResult;

/// Runs `action`. `cancel` is cancelled by `cancel_task` (cancellable actions only) and when
/// the agent stops.
pub async fn run(ctx: Arc<Context>, action: Action, cancel: CancellationToken) -> TaskResult {
    match action {
        Action::Ping => Ok(json!("pong")),
        Action::Info => Ok(json!({"api_version": 1})),
        Action::GetTask { id } => ctx.tasks.get(&id),
        Action::CancelTask { id } => ctx.tasks.cancel(&id),
        Action::GetState { full } => state::get_state(&ctx, full).await,
        Action::Start => jobs::start(&ctx).await,
        Action::Apply { spec } => deploy::apply(ctx, spec).await,
        Action::Prepare { spec } => deploy::prepare(ctx, spec).await,
        Action::CompilePackage(args) => deploy::compile_package(ctx, args, cancel).await,
        Action::UploadBlob { arg } => deploy::upload_blob(ctx, arg).await,
        Action::Stop { protocol } => jobs::stop(&ctx, protocol).await,
        Action::Drain(args) => jobs::drain(&ctx, args, cancel).await,
        Action::RunScript { name, env } => jobs::run_script(&ctx, &name, &env).await,
        Action::UpdateSettings { new } => update_settings::run(ctx, new).await,
        Action::AddPersistentDisk { cid, hint } => vm::add_persistent_disk(ctx, cid, hint).await,
        Action::RemovePersistentDisk { cid } => vm::remove_persistent_disk(ctx, cid).await,
        Action::ListDisk { .. } => vm::list_disk(ctx).await,
        Action::MountDisk { cid } => vm::mount_disk(ctx, cid).await,
        Action::UnmountDisk { cid } => vm::unmount_disk(ctx, cid).await,
        Action::MigrateDisk { old, new } => vm::migrate_disk(ctx, old, new).await,
        Action::Ssh { cmd, params } => vm::ssh(ctx, cmd, params).await,
        Action::FetchLogs { types, filters } => vm::fetch_logs(ctx, types, filters).await,
        Action::SyncDns {
            blob_id,
            digest,
            version,
        } => vm::sync_dns(ctx, blob_id, digest, version).await,
        Action::DeleteArpEntries { arg } => vm::delete_arp_entries(ctx, arg).await,
        Action::Shutdown => vm::shutdown(ctx).await,
    }
}
