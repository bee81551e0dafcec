// Package verity builds and checks dm-verity hash trees in the layout that
// `veritysetup format --no-superblock --format=1` writes, and in the
// variant that `nydus-image export --block --verity` writes.
//
// # Layout
//
// The data is cut into Params.DataBlocks blocks of Params.DataBlockSize
// bytes. Each block's digest is H(salt ‖ block) (format 1 puts the salt
// first). Digests are packed into hash blocks of Params.HashBlockSize bytes,
// each digest in a slot rounded up to a power of two (32 bytes for sha1 and
// sha256, 64 for sha512); those hash blocks form level 1. Each level-1
// block is hashed the same way to form level 2, and so on until one block
// remains: the root hash is H(salt ‖ that block). The levels are stored
// top level first, each starting on a hash-block boundary, from
// Params.HashOffset in the hash device (which may be the data file itself).
// A single data block has no tree at all: the root is its own digest.
//
// Unused digest slots at the end of each level's last block are zeros in
// Standard mode, which is what veritysetup writes and what `veritysetup
// verify` insists on. NydusCompat mode fills every unused slot with
// sha256 of a zero 4 KiB page, which is what nydus writes; the kernel
// accepts both (it hashes whole blocks), but their roots differ.
//
// # Building
//
// A Builder takes the data as it is produced, through Write or ReadFrom,
// hashes it on all cores in large batches, and writes each hash block to
// an io.WriterAt as soon as it is complete; the data is read once and never
// kept. Finish returns the Tree with the root hash:
//
//	p := verity.NydusParams(deviceBytes, 4096) // tree appended to the disk file
//	b, err := verity.NewBuilder(p, diskFile)  // or nil to keep the tree in memory
//	... io.Copy(io.MultiWriter(diskWriter, b), device) ...
//	tree, err := b.Finish()
//	fmt.Println(tree.Options()) // dm-verity options: --no-superblock ... <root>
//
// Build does the same for data already in an io.ReaderAt, and Verify checks
// data and a stored tree against a root hash, reporting the first bad block
// the way veritysetup does.
package verity
