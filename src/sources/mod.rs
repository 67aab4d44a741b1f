//! Sources: where records come from. Each source is a folder of its own that implements
//! [`crate::pipeline::Source`]:
//!
//! - [`archive`]: read JSONL archives (plain, `.gz`, `.zst`) back; done means the
//!   checkpoint moved past the record;
//! - [`cloudflare`]: pull batches from a Cloudflare queue; done means acked.
//!
//! Adding one is described in `docs/architecture.md` ("Adding a source").

pub mod archive;
pub mod cloudflare;
