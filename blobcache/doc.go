// Package blobcache is the one engine that turns a blob id into verified
// uncompressed bytes: it serves a RAFS blob's uncompressed address space,
// filled lazily, chunk by chunk, from a Backend (a blob directory, an OCI
// registry, ...), either from a cache directory that survives restarts
// (Open) or from a bounded memory LRU (OpenMemory, Options.MemoryLimit,
// 128 MiB by default). Both check every chunk's digest before serving it.
//
// Cache.OpenBlob returns a Handle: an io.ReaderAt over the uncompressed
// space (plus ReadAtContext, Size, MayStall and Close), safe for
// concurrent use; blockdev maps it into the flat device. Handles are
// reference counted: opening a blob id that is open already (a base layer
// that several images share) returns another Handle onto the same open
// blob, which is closed when its last Handle is. Cache.Stats counts opens.
//
// # One block read, from the socket to the registry
//
//   - nbd: a reader goroutine decodes an NBD_CMD_READ from the socket and
//     hands it to a handler (or serves it inline when the device's
//     MayStall says it cannot wait on a network); the handler calls the
//     device's ReadAtContext with the request's context.
//   - blockdev: Composed.ReadAtContext finds the extents the range covers
//     (a binary search over a handful: bootstrap, then each blob at its
//     mapped_blkaddr), zero-fills holes, and calls each blob Handle's
//     ReadAtContext with the same context.
//   - blobcache: Handle.ReadAtContext finds the units the range touches. In
//     a disk cache, when their ready bits are set (the warm path) it is one
//     pread of the data file. Otherwise it starts fetches for the missing
//     units (neighbours merged into bounded requests, or joins fetches in
//     flight), waits for them or for ctx, and then reads.
//   - A fetch (bounded by Options.FetchTimeout, not by one reader's
//     context, since other readers share it) calls Backend.ReadAt for the
//     stored range, decompresses each chunk, checks its digest, writes it
//     to the data file (or the memory LRU) and sets its ready bit.
//   - blobcache/registry: Backend.ReadAt is an HTTP GET of
//     /v2/REPO/blobs/sha256:ID with a Range header, retried on transient
//     failures; blobcache/localfs preads the blob file instead.
//
// A read finds the chunks it touches that are not cached yet, merges
// neighbours into bounded backend requests, shares fetches already in
// flight with other readers, decompresses (zstd, lz4_block, gzip, none),
// checks each chunk's digest, writes the bytes into the cache file and
// then serves from it. Chunks already cached are served with one pread and
// an atomic bitmap test, no locks.
//
// # Cache directory
//
// One directory (mode 0750) per cache, locked with flock(2) for as long as
// a Cache is open, so two processes never share it. Per blob id:
//
//	<id>.data  sparse file: the uncompressed space at its own offsets
//	<id>.map   ready map: 4 KiB header (magic, version, unit count and size,
//	           fingerprint), then one bit per unit, MSB first
//	<id>.meta  the blob bytes read to learn its layout (chunk-info array
//	           and meta header, digest section, ToC), so a restart reads
//	           nothing from the backend
//
// A unit is a chunk (by its chunk-info index) for ordinary blobs, and a
// fixed range (Options.TarfsUnitSize, 1 MiB by default) for tarfs blobs.
//
// # Crash safety
//
// The map header and the meta file are written to a temporary file, synced
// and renamed into place. A unit's bit is set in the map only after its
// bytes were written to the data file, verified, and the data file was
// fdatasync'ed; bits only ever go from 0 to 1 and are written from an
// in-memory copy that holds durable bits only. So after a crash at any
// point a set bit always means correct bytes on disk; a lost bit only
// means a refetch. Readers in the same process may be served a unit as
// soon as it is written and verified (the page cache holds it); the flush
// that makes it durable runs in the background (Options.FlushInterval)
// and at Close. A map whose fingerprint does not match the blob entry and
// its chunk digests is removed before the data file is reset.
//
// # Verification
//
// Each chunk's uncompressed bytes are checked against its digest (blake3
// or sha256, the blob's digester): from the bootstrap chunk table (the
// entry with the same blob index and chunk-info index), or, for blobs with
// INLINED_CHUNK_DIGEST, from the blob's own digest section, which is found
// through the blob's ToC and checked against the ToC digest that the
// bootstrap's blob table holds. A chunk without a digest is refused unless
// Options.AllowUnverified is set.
//
// Tarfs blobs (an uncompressed OCI layer tar, no chunk-info array) have no
// chunk digests. What is checked: the stored size equals the bootstrap's
// uncompressed size when the blob is opened (a memory-only cache, or a
// disk cache that has no ready map for it yet), which catches appended or
// missing bytes. What is not: changed bytes of the same length. Their units
// are cached as fetched, with the same ready map and crash-safety
// ordering; a memory-only cache reads them straight from the backend. The
// hook for binding them to the layer (the layer digest, or a dm-verity
// tree over the tar, issue 12) is layout.verify: a tarfs unit has
// hasDigest false today, and a verifier of tar ranges belongs there.
package blobcache
