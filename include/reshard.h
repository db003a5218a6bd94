/*
 * reshard C ABI: auto conversion of MindSpore / mindformers checkpoints in a
 * training job, callable in-process from a launcher or training code.
 *
 * Link with -lreshard (libreshard.so, built by `cargo build --release`
 * into target/release/). Every rank of the job calls reshard_auto_convert
 * with the same settings; it decides whether the checkpoint needs
 * converting for the job, converts this rank's share when this rank is a
 * converting rank, waits for the others, and returns the file this rank
 * must load. See docs/auto.md.
 *
 * The rank comes from RANK_ID (or "rank_id"), the world size from RANK_SIZE
 * (or "world_size"), the node size from npu_num_per_node or
 * DEVICE_NUM_PER_NODE (default 8).
 *
 * Strings stored in the out parameters are owned by reshard: release each
 * with reshard_string_free. All functions are thread-safe; a conversion
 * blocks the calling thread until this rank's file is ready.
 */
#ifndef RESHARD_H
#define RESHARD_H

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Return codes of reshard_auto_convert. Every failure also sets *out_error
 * to the message (naming the file and tensor where it applies). A failure
 * returns the code of its kind, so a caller can branch on it; code 1 is an
 * internal error (a bug in reshard). Codes may be added in later versions:
 * treat any unknown non-zero code as a failure.
 */
#define RESHARD_OK 0            /* success */
#define RESHARD_FAILED 1        /* internal error (a bug in reshard; please report) */
#define RESHARD_BAD_ARGUMENTS 2 /* not UTF-8, settings not a JSON object, unknown key */
#define RESHARD_E_USAGE 3 /* a bad setting or combination of settings (the YAML/JSON keys) */
#define RESHARD_E_BAD_INPUT 4 /* an input file that is not a valid checkpoint, strategy or config */
#define RESHARD_E_DAMAGED 5 /* a stored checksum does not match: the file is damaged */
#define RESHARD_E_ENCRYPTED 6 /* encrypted input without a key, or a wrong key or mode */
#define RESHARD_E_STRATEGY 7 /* a strategy that makes no sense or does not fit the checkpoint */
#define RESHARD_E_MISSING 8 /* a rank, shard, file or tensor that is needed is missing */
#define RESHARD_E_MISMATCH 9 /* shapes, dtypes or sizes that disagree */
#define RESHARD_E_UNSUPPORTED 10 /* a well-formed input or request reshard does not handle */
#define RESHARD_E_IO 11 /* an operating-system I/O error */
#define RESHARD_E_DESTINATION 12 /* the destination cannot be written: locked, unsafe, not empty */
#define RESHARD_E_SOURCE_CHANGED 13 /* a source file changed while it was read */
#define RESHARD_E_LIMIT 14 /* an input declares more than reshard accepts */
#define RESHARD_E_DEVICE 15 /* a device backend failed or is unavailable */
#define RESHARD_E_JOB 16 /* the distributed job failed as a whole (a peer died, ranks disagree) */
#define RESHARD_E_INTERRUPTED 17 /* interrupted by a signal */

/*
 * config_path:   a mindformers YAML (load_checkpoint, src_strategy_path_or_dir,
 *                auto_trans_ckpt, transform_process_num, transform_by_rank,
 *                npu_num_per_node, use_parallel, only_save_strategy, output_dir,
 *                load_ckpt_format, remove_redundancy, resume_training,
 *                parallel_config), or NULL.
 * settings_json: a JSON object overriding the YAML: the same keys, plus
 *                "rank_id", "world_size", "node_local" (no shared disk),
 *                "dst_strategy", "workers", "timeout_s",
 *                "heartbeat_timeout_s", "poll_ms", "force",
 *                "unified_checkpoint" (also write output/unified_checkpoint/
 *                as mindformers' safetensors flow does), "exchange"
 *                ("files" or "hccl": ranks exchange slices over HCCL, no
 *                shared disk; Ascend builds), "rendezvous" ("host:port"
 *                where rank 0 serves the HCCL root info); or NULL.
 *                Example: {"rank_id": 3, "world_size": 8, "node_local": true}
 * out_path:      set to the file this rank loads, or to NULL when there is
 *                nothing to load (only_save_strategy, no load_checkpoint).
 * out_report_json: set to the full report (JSON: action, reason, paths,
 *                converters, notes, ...). May be NULL.
 * out_error:     set to the error text on failure, else NULL. May be NULL.
 */
int reshard_auto_convert(const char *config_path,
                         const char *settings_json,
                         char **out_path,
                         char **out_report_json,
                         char **out_error);

/* Releases a string returned by reshard (NULL is ignored). */
void reshard_string_free(char *s);

/* reshard's version (static; do not free). */
const char *reshard_version(void);

#ifdef __cplusplus
}
#endif

#endif /* RESHARD_H */
