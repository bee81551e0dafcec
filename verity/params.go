package verity

import (
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"math"
	"math/bits"
	"strconv"
	"strings"
)

// Compat selects what fills the unused digest slots of a hash block.
type Compat int

const (
	// Standard fills unused slots with zeros, like veritysetup.
	Standard Compat = iota
	// NydusCompat fills them with sha256 of a zero 4 KiB page, like
	// nydus-image export --verity. Requires sha256, 4 KiB hash blocks and
	// no salt, the only parameters nydus uses.
	NydusCompat
)

func (c Compat) String() string {
	switch c {
	case Standard:
		return "standard"
	case NydusCompat:
		return "nydus"
	}
	return "Compat(" + strconv.Itoa(int(c)) + ")"
}

// ParseCompat accepts "standard" (or "") and "nydus".
func ParseCompat(s string) (Compat, error) {
	switch strings.ToLower(s) {
	case "", "standard", "veritysetup":
		return Standard, nil
	case "nydus":
		return NydusCompat, nil
	}
	return 0, fmt.Errorf("verity: unknown compat mode %q (want standard or nydus)", s)
}

// Limits accepted by Validate. veritysetup accepts the same block sizes;
// the kernel target additionally wants blocks no larger than a page.
const (
	MinBlockSize = 512
	MaxBlockSize = 64 << 10
	MaxSaltSize  = 256 // veritysetup's limit
)

// Params are the veritysetup format-1 parameters of one tree. All fields
// but Salt and Compat must be set; NydusParams fills them for the common
// case.
type Params struct {
	Algorithm     string // "sha256", "sha1" or "sha512"
	DataBlockSize int    // bytes per data block: a power of two, 512..64 KiB
	HashBlockSize int    // bytes per hash block: a power of two, 512..64 KiB
	DataBlocks    uint64 // number of data blocks covered, at least 1
	HashOffset    uint64 // byte offset of the tree in the hash device; a multiple of HashBlockSize
	Salt          []byte // prepended to every hashed block; empty for none
	Compat        Compat // what fills unused digest slots
}

// NydusParams returns the parameters nydus-image export --block --verity
// uses for a device of deviceBytes bytes in blocks of blockSize (4096, or
// 512 for tarfs): sha256, 4 KiB hash blocks, no salt, nydus slot filling,
// and the tree appended to the disk file at the next 4 KiB boundary.
// Validate reports a deviceBytes that is not a whole number of blocks.
func NydusParams(deviceBytes uint64, blockSize int) Params {
	p := Params{
		Algorithm:     "sha256",
		DataBlockSize: blockSize,
		HashBlockSize: 4096,
		Compat:        NydusCompat,
	}
	if blockSize > 0 {
		p.DataBlocks = deviceBytes / uint64(blockSize)
		if deviceBytes%uint64(blockSize) != 0 {
			p.DataBlocks = 0 // rejected by Validate with a clear message
		}
	}
	p.HashOffset = AppendedHashOffset(deviceBytes, p.HashBlockSize)
	return p
}

// AppendedHashOffset is where a tree appended to dataBytes of data starts:
// the data size rounded up to a hash block, as nydus and the veritysetup
// recipes do. The gap, if any, must read as zeros.
func AppendedHashOffset(dataBytes uint64, hashBlockSize int) uint64 {
	if hashBlockSize <= 0 {
		return dataBytes
	}
	hb := uint64(hashBlockSize)
	return (dataBytes + hb - 1) / hb * hb
}

// algorithm describes one supported hash function.
type algorithm struct {
	newHash func() hash.Hash
	size    int
}

func lookupAlgorithm(name string) (algorithm, bool) {
	switch name {
	case "sha256":
		return algorithm{sha256.New, sha256.Size}, true
	case "sha1":
		return algorithm{sha1.New, sha1.Size}, true
	case "sha512":
		return algorithm{sha512.New, sha512.Size}, true
	}
	return algorithm{}, false
}

// Validate reports the first parameter that veritysetup (or nydus, in
// NydusCompat mode) would not accept or that this package cannot honour.
func (p Params) Validate() error {
	alg, ok := lookupAlgorithm(p.Algorithm)
	if !ok {
		return fmt.Errorf("verity: unsupported hash algorithm %q (want sha256, sha1 or sha512)", p.Algorithm)
	}
	if err := checkBlockSize("data", p.DataBlockSize); err != nil {
		return err
	}
	if err := checkBlockSize("hash", p.HashBlockSize); err != nil {
		return err
	}
	if 2*slotSize(alg.size) > p.HashBlockSize {
		return fmt.Errorf("verity: hash block size %d holds fewer than two %s digests", p.HashBlockSize, p.Algorithm)
	}
	if p.DataBlocks == 0 {
		return errors.New("verity: no data blocks (the data size must be a positive multiple of the data block size)")
	}
	if p.DataBlocks > math.MaxInt64/uint64(p.DataBlockSize) {
		return fmt.Errorf("verity: %d data blocks of %d bytes overflow a file offset", p.DataBlocks, p.DataBlockSize)
	}
	if p.HashOffset%uint64(p.HashBlockSize) != 0 {
		return fmt.Errorf("verity: hash offset %d is not a multiple of the hash block size %d", p.HashOffset, p.HashBlockSize)
	}
	if len(p.Salt) > MaxSaltSize {
		return fmt.Errorf("verity: salt of %d bytes is longer than %d", len(p.Salt), MaxSaltSize)
	}
	switch p.Compat {
	case Standard:
	case NydusCompat:
		if p.Algorithm != "sha256" || p.HashBlockSize != 4096 || len(p.Salt) != 0 {
			return errors.New("verity: nydus compat mode needs sha256, 4096-byte hash blocks and no salt")
		}
	default:
		return fmt.Errorf("verity: unknown compat mode %d", int(p.Compat))
	}
	size := newLayout(p, alg.size).size
	if size > math.MaxInt64-p.HashOffset {
		return fmt.Errorf("verity: hash offset %d plus a %d-byte tree overflows a file offset", p.HashOffset, size)
	}
	return nil
}

func checkBlockSize(what string, n int) error {
	if n < MinBlockSize || n > MaxBlockSize || n&(n-1) != 0 {
		return fmt.Errorf("verity: %s block size %d is not a power of two between %d and %d", what, n, MinBlockSize, MaxBlockSize)
	}
	return nil
}

// DataSize is the number of data bytes the tree covers.
func (p Params) DataSize() uint64 { return p.DataBlocks * uint64(p.DataBlockSize) }

// DigestSize is the size of one digest (and of the root hash) in bytes, or
// 0 for an unsupported algorithm.
func (p Params) DigestSize() int {
	alg, _ := lookupAlgorithm(p.Algorithm)
	return alg.size
}

// TreeSize is the size in bytes of the hash area written at HashOffset
// (0 for a single data block). The params must be valid.
func (p Params) TreeSize() uint64 { return newLayout(p, p.DigestSize()).size }

// HashBlocks is the number of hash blocks in the tree.
func (p Params) HashBlocks() uint64 { return p.TreeSize() / uint64(p.HashBlockSize) }

// VeritysetupArgs are the options that make veritysetup format, verify or
// open use these parameters, e.g. for
// `veritysetup verify <args> DATA HASH ROOT`.
// NydusCompat has no veritysetup equivalent: verify rejects its nonzero
// spare slots, while open (the kernel) accepts them.
func (p Params) VeritysetupArgs() []string {
	return []string{
		"--no-superblock", "--format=1",
		"--hash=" + p.Algorithm,
		"--data-block-size=" + strconv.Itoa(p.DataBlockSize),
		"--hash-block-size=" + strconv.Itoa(p.HashBlockSize),
		"--data-blocks=" + strconv.FormatUint(p.DataBlocks, 10),
		"--hash-offset=" + strconv.FormatUint(p.HashOffset, 10),
		"--salt=" + p.saltArg(),
	}
}

func (p Params) saltArg() string {
	if len(p.Salt) == 0 {
		return "-"
	}
	return hex.EncodeToString(p.Salt)
}

// OptionsLine renders the line nydus-image prints after exporting a disk
// with verity, which nydus-snapshotter parses:
//
//	dm-verity options: --no-superblock --format=1 -s "" --hash=sha256 --data-block-size=4096 --hash-block-size=4096 --data-blocks 521 --hash-offset 2134016 <root hex>
//
// A non-empty salt is rendered as -s <hex>.
func (p Params) OptionsLine(root []byte) string {
	salt := `""`
	if len(p.Salt) > 0 {
		salt = hex.EncodeToString(p.Salt)
	}
	return fmt.Sprintf("dm-verity options: --no-superblock --format=1 -s %s --hash=%s --data-block-size=%d --hash-block-size=%d --data-blocks %d --hash-offset %d %x",
		salt, p.Algorithm, p.DataBlockSize, p.HashBlockSize, p.DataBlocks, p.HashOffset, root)
}

// slotSize is the space one digest takes in a format-1 hash block: the
// digest size rounded up to a power of two.
func slotSize(digestSize int) int {
	return 1 << bits.Len(uint(digestSize-1))
}

// layout is the shape of one tree, computed as veritysetup does.
type layout struct {
	digestSize   int
	slot         int      // bytes per digest slot
	perBlock     int      // digests per hash block, a power of two
	levels       int      // 0 for a single data block
	levelBlocks  []uint64 // hash blocks per level, index 0 = level 1 (data digests)
	levelStart   []uint64 // first hash block of each level, counted from HashOffset
	size         uint64   // bytes of the whole hash area
	hashBlockLen uint64
}

func newLayout(p Params, digestSize int) layout {
	l := layout{digestSize: digestSize, hashBlockLen: uint64(p.HashBlockSize)}
	if digestSize <= 0 || p.HashBlockSize <= 0 {
		return l
	}
	l.slot = slotSize(digestSize)
	perBlockBits := bits.Len(uint(p.HashBlockSize/digestSize)) - 1
	l.perBlock = 1 << perBlockBits
	for n := p.DataBlocks; n > 1; n = ceilDiv(n, uint64(l.perBlock)) {
		l.levelBlocks = append(l.levelBlocks, ceilDiv(n, uint64(l.perBlock)))
	}
	l.levels = len(l.levelBlocks)
	l.levelStart = make([]uint64, l.levels)
	var pos uint64
	for i := l.levels - 1; i >= 0; i-- {
		l.levelStart[i] = pos
		pos += l.levelBlocks[i]
	}
	l.size = pos * l.hashBlockLen
	return l
}

// entries is the number of digests stored in level i (0-based): the data
// blocks for level 0, the blocks of level i-1 above that.
func (l *layout) entries(p *Params, i int) uint64 {
	if i == 0 {
		return p.DataBlocks
	}
	return l.levelBlocks[i-1]
}

func ceilDiv(a, b uint64) uint64 { return a/b + min(a%b, 1) }
