// Package blobcache serves a RAFS blob's uncompressed address space from a
// local cache that is filled lazily, chunk by chunk, from a Backend (a blob
// directory, an OCI registry, ...), and that survives restarts.
//
// A Blob is an io.ReaderAt over the uncompressed space (plus Size and
// Close), safe for concurrent use; blockdev maps it into the flat device.
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
// digests at all: their units are cached as fetched, with the same ready
// map and crash-safety ordering, but nothing checks their bytes. Trust in
// them comes from the transport (the registry digest of the layer) alone.
package blobcache
