"""Step 2's transfer engine: PUT a source's bytes to awork's pre-signed (Azure Blob SAS) URL.

Why it is more than `curl --data-binary @file`:
- memory stays flat whatever the size: files are streamed, blocks are read one at a time and at
  most `parallel_blocks` of them are held in memory;
- a PUT that dies at 90% does not start from zero: large sources go up as Put Block / Put Block
  List, and every acknowledged block is recorded in a `BlockJournal`, so a retried or redelivered
  step resumes;
- a corrupted upload is never linked: every request carries a Content-MD5 the server verifies
  (a block corrupted in flight is sent again), and the committed blob gets the whole file's MD5;
- the URL is a write credential for one foreign host: it only goes to allow-listed hosts, never
  with an Authorization header, and it is never logged (see `redact_url`).

Routes:
- size <= `single_put_threshold` (64 MiB, as Azure's SDK): one streamed Put Blob with a
  Content-MD5 computed beforehand;
- larger: Put Block (`block_size`, `parallel_blocks` in flight, each with its MD5 and retries),
  then Put Block List with `x-ms-blob-content-type` and `x-ms-blob-content-md5`;
- a host that refuses block operations (not for expiry) gets one streamed Put Blob instead, and
  is remembered in a `FallbackStore` so later uploads go there directly.

URL sources (`UrlSource`) are never written to disk. Content-MD5 has to be sent before the body,
so a URL source is only sent as one Put Blob when it fits in one block (it is then held in memory:
at most `block_size`); otherwise it goes up as blocks, each block's MD5 computed from the bytes
in memory. Only when the host refuses blocks is a large URL source sent as one streamed Put Blob
without Content-MD5: its MD5 is computed while streaming and compared with the Content-MD5 the
server returns (Azure computes it for Put Blob); a mismatch is a TransientError, so the upload is
retried and never linked. A URL source of unknown size on such a host is the one case spooled to a
temporary file (Put Blob needs a Content-Length).

Modules: `uploader` (BlobUploader, the routes), `single` (Put Blob), `blocks` (Put Block, Put
Block List), `transport` (sessions, PUT and its one retry loop), `errors` (reading the host's
answers), `urls` (allow-list, SAS expiry), `fallback` (hosts without blocks), `progress`,
`body` (streamed request bodies), `transfer` (policy, per-call state, outcome).
"""

from workers.blob.blocks import block_id
from workers.blob.errors import BLOCK_REFUSAL_CODES, EXPIRY_CODES
from workers.blob.fallback import PROCESS_FALLBACKS, FallbackStore, MemoryFallbackStore, RedisFallbackStore
from workers.blob.sessions import plain_session
from workers.blob.transfer import TransferPolicy, UploadOutcome
from workers.blob.uploader import BlobUploader
from workers.blob.urls import check_upload_url, upload_identity, url_expiry

__all__ = [
    "BLOCK_REFUSAL_CODES",
    "EXPIRY_CODES",
    "PROCESS_FALLBACKS",
    "BlobUploader",
    "FallbackStore",
    "MemoryFallbackStore",
    "RedisFallbackStore",
    "TransferPolicy",
    "UploadOutcome",
    "block_id",
    "check_upload_url",
    "plain_session",
    "upload_identity",
    "url_expiry",
]
