#![cfg_attr(not(any(test, feature = "std")), no_std)]
//! Placeholder; the frame format lands with the ingest issue.
