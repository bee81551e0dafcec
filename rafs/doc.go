// Package rafs reads and writes Nydus RAFS v6 bootstraps: EROFS images whose
// file data lives in external blobs, addressed through a device table.
//
// format.go holds the on-disk structures with one Decode and one Encode each;
// the reader validates every field it decodes and reports the offset and
// field of anything it rejects; the writer lays out a bootstrap that both the
// Linux kernel and nydus accept. The byte-level spec is
// shared/docs/rafsv6-format.md.
package rafs
