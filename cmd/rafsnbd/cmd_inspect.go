package main

import (
	"bufio"
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v3"

	"github.com/rafsnbd/rafsnbd/rafs"
)

func init() {
	register(func() *cli.Command {
		return &cli.Command{
			Name:      "inspect",
			Usage:     "show what a RAFS v6 bootstrap holds: superblocks, blobs, inode counts, optionally the file tree",
			ArgsUsage: "BOOTSTRAP",
			Description: `Parses and validates a RAFS v6 bootstrap (the metadata of a Nydus image or
layer) and prints:

  - the EROFS superblock and the RAFS extended superblock, flags by name;
  - every blob: id, compressor, digester, chunk size and count, compressed
    and uncompressed sizes, features by name, and where its data sits in the
    flat block device (mapped_blkaddr, blocks);
  - counts of inodes by type and of file chunks, from a full walk of the tree.

With --tree it also lists every path with mode, uid:gid, size, mtime (UTC)
and symlink target, in directory order. With --json everything is printed as
one JSON object with stable snake_case field names, for scripts:

  rafsnbd inspect image.boot
  rafsnbd inspect --tree image.boot | less
  rafsnbd inspect --json image.boot | jq '.blobs[].id'

The whole tree is validated on the way (names, directory order, chunk
indexes against the blob table), so inspect also serves as a quick fsck of
the metadata: it exits non-zero, naming the structure, field and byte
offset, on the first violation. Blob data is not read.`,
			Flags: []cli.Flag{
				&cli.BoolFlag{Name: "json", Usage: "print one JSON object instead of text"},
				&cli.BoolFlag{Name: "tree", Usage: "also list every path (mode, uid:gid, size or major,minor, mtime, link target)"},
			},
			Action: runInspect,
		}
	})
}

func runInspect(ctx context.Context, c *cli.Command) error {
	if c.NArg() != 1 {
		return usagef(c, "want one BOOTSTRAP argument, got %d", c.NArg())
	}
	name := c.Args().First()
	img, err := rafs.Open(name)
	if err != nil {
		return err
	}
	defer img.Close()
	report, err := inspectImage(img, name, c.Bool("tree"))
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	if c.Bool("json") {
		enc := json.NewEncoder(c.Root().Writer)
		enc.SetIndent("", "  ")
		return enc.Encode(report)
	}
	return printInspect(c.Root().Writer, report)
}

// inspectReport is the --json output; its field names are a stable
// interface for scripts.
type inspectReport struct {
	Bootstrap     string             `json:"bootstrap"`
	Size          int64              `json:"size"`
	Superblock    inspectSuperblock  `json:"superblock"`
	ExtSuperblock inspectExtSB       `json:"ext_superblock"`
	Blobs         []inspectBlob      `json:"blobs"`
	Counts        inspectCounts      `json:"counts"`
	Tree          []inspectTreeEntry `json:"tree,omitempty"`
}

type inspectSuperblock struct {
	Magic           string   `json:"magic"`
	BlockSize       uint32   `json:"block_size"`
	BlkSzBits       uint8    `json:"blkszbits"`
	RootNid         uint16   `json:"root_nid"`
	Inos            uint64   `json:"inos"`
	Blocks          uint32   `json:"blocks"`
	MetaBlkAddr     uint32   `json:"meta_blkaddr"`
	BuildTime       uint64   `json:"build_time"`
	BuildTimeNsec   uint32   `json:"build_time_nsec"`
	FeatureCompat   uint32   `json:"feature_compat"`
	CompatNames     []string `json:"feature_compat_names"`
	FeatureIncompat uint32   `json:"feature_incompat"`
	IncompatNames   []string `json:"feature_incompat_names"`
	ExtraDevices    uint16   `json:"extra_devices"`
	UUID            string   `json:"uuid"`
}

type inspectExtSB struct {
	Flags               uint64   `json:"flags"`
	FlagNames           []string `json:"flag_names"`
	Compressor          string   `json:"compressor"`
	Digester            string   `json:"digester"`
	Tarfs               bool     `json:"tarfs"`
	ChunkSize           uint32   `json:"chunk_size"`
	BlobTableOffset     uint64   `json:"blob_table_offset"`
	BlobTableSize       uint32   `json:"blob_table_size"`
	ChunkTableOffset    uint64   `json:"chunk_table_offset"`
	ChunkTableSize      uint64   `json:"chunk_table_size"`
	ChunkTableEntries   int      `json:"chunk_table_entries"`
	PrefetchTableOffset uint64   `json:"prefetch_table_offset"`
	PrefetchTableSize   uint32   `json:"prefetch_table_size"`
	Prefetch            []uint32 `json:"prefetch"`
}

type inspectBlob struct {
	Index              int      `json:"index"`
	ID                 string   `json:"id"`
	Compressor         string   `json:"compressor"`
	Digester           string   `json:"digester"`
	ChunkSize          uint32   `json:"chunk_size"`
	ChunkCount         uint32   `json:"chunk_count"`
	CompressedSize     uint64   `json:"compressed_size"`
	UncompressedSize   uint64   `json:"uncompressed_size"`
	Features           uint32   `json:"features"`
	FeatureNames       []string `json:"feature_names"`
	MappedBlkAddr      uint32   `json:"mapped_blkaddr"`
	Blocks             uint32   `json:"blocks"`
	CICompressor       string   `json:"ci_compressor"`
	CIOffset           uint64   `json:"ci_offset"`
	CICompressedSize   uint64   `json:"ci_compressed_size"`
	CIUncompressedSize uint64   `json:"ci_uncompressed_size"`
	TOCSize            uint32   `json:"toc_size"`
	TOCDigest          string   `json:"toc_digest"`
}

type inspectCounts struct {
	Paths        int    `json:"paths"`
	Inodes       int    `json:"inodes"` // distinct nids
	Directories  int    `json:"directories"`
	RegularFiles int    `json:"regular_files"`
	Symlinks     int    `json:"symlinks"`
	CharDevices  int    `json:"char_devices"`
	BlockDevices int    `json:"block_devices"`
	Fifos        int    `json:"fifos"`
	Sockets      int    `json:"sockets"`
	HardLinks    int    `json:"hard_links"` // paths beyond the first to an inode
	Chunks       int    `json:"chunks"`     // chunk indexes of distinct regular files
	HoleChunks   int    `json:"hole_chunks"`
	FileBytes    uint64 `json:"file_bytes"` // sum of distinct regular files' sizes
	Xattrs       int    `json:"xattrs"`
}

type inspectTreeEntry struct {
	Path   string `json:"path"`
	Nid    uint64 `json:"nid"`
	Mode   string `json:"mode"`       // as ls -l shows it
	Perm   string `json:"mode_octal"` // st_mode in octal, type bits included
	UID    uint32 `json:"uid"`
	GID    uint32 `json:"gid"`
	Size   uint64 `json:"size"`
	Mtime  string `json:"mtime"`
	Target string `json:"target,omitempty"`
	Rdev   string `json:"rdev,omitempty"` // "major,minor" of devices

	modTime time.Time // for the fixed-width text column
}

func inspectImage(img *rafs.Image, name string, tree bool) (*inspectReport, error) {
	sb, ext := &img.Superblock, &img.ExtSuperblock
	r := &inspectReport{
		Bootstrap: name,
		Size:      img.Size,
		Superblock: inspectSuperblock{
			Magic: fmt.Sprintf("%#x", sb.Magic), BlockSize: img.BlockSize, BlkSzBits: sb.BlkSzBits,
			RootNid: sb.RootNid, Inos: sb.Inos, Blocks: sb.Blocks, MetaBlkAddr: sb.MetaBlkAddr,
			BuildTime: sb.BuildTime, BuildTimeNsec: sb.BuildTimeNsec,
			FeatureCompat: sb.FeatureCompat, CompatNames: rafs.FeatureCompatNames(sb.FeatureCompat),
			FeatureIncompat: sb.FeatureIncompat, IncompatNames: rafs.FeatureIncompatNames(sb.FeatureIncompat),
			ExtraDevices: sb.ExtraDevices, UUID: formatUUID(sb.UUID),
		},
		ExtSuperblock: inspectExtSB{
			Flags: ext.Flags, FlagNames: rafs.ExtFlagNames(ext.Flags),
			Compressor: img.Compressor().String(), Digester: img.Digester().String(), Tarfs: img.IsTarfs(),
			ChunkSize: ext.ChunkSize, BlobTableOffset: ext.BlobTableOffset, BlobTableSize: ext.BlobTableSize,
			ChunkTableOffset: ext.ChunkTableOffset, ChunkTableSize: ext.ChunkTableSize, ChunkTableEntries: len(img.ChunkTable),
			PrefetchTableOffset: ext.PrefetchTableOffset, PrefetchTableSize: ext.PrefetchTableSize,
			Prefetch: append([]uint32{}, img.PrefetchTable...),
		},
		Blobs: []inspectBlob{},
	}
	for i := range img.Blobs {
		b, d := &img.Blobs[i], &img.DeviceSlots[i]
		r.Blobs = append(r.Blobs, inspectBlob{
			Index: i, ID: b.ID(), Compressor: b.Compressor.String(), Digester: b.Digester.String(),
			ChunkSize: b.ChunkSize, ChunkCount: b.ChunkCount,
			CompressedSize: b.CompressedSize, UncompressedSize: b.UncompressedSize,
			Features: b.Features, FeatureNames: rafs.BlobFeatureNames(b.Features),
			MappedBlkAddr: d.MappedBlkAddr, Blocks: d.Blocks,
			CICompressor: b.CICompressor.String(), CIOffset: b.CIOffset,
			CICompressedSize: b.CICompressedSize, CIUncompressedSize: b.CIUncompressedSize,
			TOCSize: b.TOCSize, TOCDigest: hex.EncodeToString(b.TOCDigest[:]),
		})
	}
	seen := map[uint64]bool{}
	cnt := &r.Counts
	err := img.Walk(func(p string, e *rafs.Entry) error {
		cnt.Paths++
		if tree {
			r.Tree = append(r.Tree, inspectTreeEntry{
				Path: p, Nid: e.Nid, Mode: lsMode(e.Mode), Perm: fmt.Sprintf("%06o", e.Mode), UID: e.UID, GID: e.GID, Size: e.Size,
				Rdev:  rdevString(e),
				Mtime: e.ModTime().UTC().Format(time.RFC3339Nano), Target: e.Target, modTime: e.ModTime().UTC(),
			})
		}
		if seen[e.Nid] {
			cnt.HardLinks++
			return nil
		}
		seen[e.Nid] = true
		cnt.Inodes++
		cnt.Xattrs += len(e.Xattrs)
		switch e.Mode & rafs.ModeTypeMask {
		case rafs.ModeDir:
			cnt.Directories++
		case rafs.ModeRegular:
			cnt.RegularFiles++
			cnt.FileBytes += e.Size
			cnt.Chunks += len(e.Chunks)
			for _, ch := range e.Chunks {
				if ch.BlkAddr == rafs.NullBlkAddr {
					cnt.HoleChunks++
				}
			}
		case rafs.ModeSymlink:
			cnt.Symlinks++
		case rafs.ModeChar:
			cnt.CharDevices++
		case rafs.ModeBlock:
			cnt.BlockDevices++
		case rafs.ModeFifo:
			cnt.Fifos++
		case rafs.ModeSocket:
			cnt.Sockets++
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return r, nil
}

// lsMode renders st_mode as ls -l does ("drwxr-xr-x", "-rwsr-xr-x").
func lsMode(mode uint16) string {
	b := []byte("?rwxrwxrwx")
	switch mode & rafs.ModeTypeMask {
	case rafs.ModeRegular:
		b[0] = '-'
	case rafs.ModeDir:
		b[0] = 'd'
	case rafs.ModeSymlink:
		b[0] = 'l'
	case rafs.ModeChar:
		b[0] = 'c'
	case rafs.ModeBlock:
		b[0] = 'b'
	case rafs.ModeFifo:
		b[0] = 'p'
	case rafs.ModeSocket:
		b[0] = 's'
	}
	for i := range 9 {
		if mode&(1<<(8-i)) == 0 {
			b[1+i] = '-'
		}
	}
	special := func(bit uint16, pos int, set, unset byte) {
		if mode&bit != 0 {
			if b[pos] == '-' {
				b[pos] = unset
			} else {
				b[pos] = set
			}
		}
	}
	special(0o4000, 3, 's', 'S')
	special(0o2000, 6, 's', 'S')
	special(0o1000, 9, 't', 'T')
	return string(b)
}

// rdevString is "major,minor" for devices (Linux encoding), else "".
func rdevString(e *rafs.Entry) string {
	if t := e.Mode & rafs.ModeTypeMask; t != rafs.ModeChar && t != rafs.ModeBlock {
		return ""
	}
	major, minor := rafs.DecodeRdev(e.Rdev)
	return fmt.Sprintf("%d,%d", major, minor)
}

func formatUUID(u [16]byte) string {
	h := hex.EncodeToString(u[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}

func joinNames(v uint64, names []string) string {
	if len(names) == 0 {
		return fmt.Sprintf("%#x", v)
	}
	return fmt.Sprintf("%#x (%s)", v, strings.Join(names, ", "))
}

// humanBytes prints a byte count with a binary-unit approximation.
func humanBytes(n uint64) string {
	if n < 1024 {
		return fmt.Sprintf("%d bytes", n)
	}
	v, unit := scaleBytes(n)
	if v == float64(uint64(v)) {
		return fmt.Sprintf("%d bytes (%d %s)", n, uint64(v), unit)
	}
	return fmt.Sprintf("%d bytes (%.1f %s)", n, v, unit)
}

func printInspect(out io.Writer, r *inspectReport) error {
	// Summary lines are "label\tvalue"; labels are padded to one width so
	// that every section lines up.
	w := bufio.NewWriter(out)
	sb, ext := &r.Superblock, &r.ExtSuperblock
	p := func(format string, args ...any) {
		label, value, _ := strings.Cut(fmt.Sprintf(format, args...), "\t")
		if value == "" {
			fmt.Fprintln(w, label)
		} else {
			fmt.Fprintf(w, "%-22s%s\n", label, value)
		}
	}
	p("Bootstrap\t%s", r.Bootstrap)
	p("  size\t%s", humanBytes(uint64(r.Size)))
	p("Superblock")
	p("  magic\t%s", sb.Magic)
	p("  block size\t%d (blkszbits %d)", sb.BlockSize, sb.BlkSzBits)
	p("  root nid\t%d", sb.RootNid)
	p("  inodes\t%d", sb.Inos)
	p("  blocks\t%d", sb.Blocks)
	p("  meta blkaddr\t%d (byte %d)", sb.MetaBlkAddr, uint64(sb.MetaBlkAddr)*uint64(sb.BlockSize))
	p("  build time\t%s", time.Unix(int64(sb.BuildTime), int64(sb.BuildTimeNsec)).UTC().Format(time.RFC3339Nano))
	p("  feature compat\t%s", joinNames(uint64(sb.FeatureCompat), sb.CompatNames))
	p("  feature incompat\t%s", joinNames(uint64(sb.FeatureIncompat), sb.IncompatNames))
	p("  extra devices\t%d", sb.ExtraDevices)
	p("  uuid\t%s", sb.UUID)
	p("Extended superblock")
	p("  flags\t%s", joinNames(ext.Flags, ext.FlagNames))
	mode := "normal (4 KiB blocks, blobs hold compressed chunks)"
	if ext.Tarfs {
		mode = "tarfs (512 B blocks, blobs are raw tar files)"
	}
	p("  mode\t%s", mode)
	p("  compressor\t%s", ext.Compressor)
	p("  digester\t%s", ext.Digester)
	p("  chunk size\t%s", humanBytes(uint64(ext.ChunkSize)))
	p("  blob table\toffset %d, %d bytes", ext.BlobTableOffset, ext.BlobTableSize)
	if ext.ChunkTableSize > 0 {
		p("  chunk table\toffset %d, %d bytes, %d entries", ext.ChunkTableOffset, ext.ChunkTableSize, ext.ChunkTableEntries)
	} else {
		p("  chunk table\tnone")
	}
	if len(ext.Prefetch) > 0 {
		list := fmt.Sprint(ext.Prefetch)
		if len(ext.Prefetch) > 16 {
			list = fmt.Sprintf("%v …", ext.Prefetch[:16])
		}
		p("  prefetch table\toffset %d, %d inodes: %s", ext.PrefetchTableOffset, len(ext.Prefetch), list)
	} else {
		p("  prefetch table\tnone")
	}
	for _, b := range r.Blobs {
		p("Blob %d\t%s", b.Index, b.ID)
		p("  compressor\t%s", b.Compressor)
		p("  digester\t%s", b.Digester)
		p("  chunks\t%d of %s", b.ChunkCount, humanBytes(uint64(b.ChunkSize)))
		p("  compressed size\t%s", humanBytes(b.CompressedSize))
		p("  uncompressed size\t%s", humanBytes(b.UncompressedSize))
		p("  features\t%s", joinNames(uint64(b.Features), b.FeatureNames))
		if b.MappedBlkAddr == 0 {
			p("  mapped blkaddr\t0 (not set: this image cannot be exported as a flat block device)")
		} else {
			p("  mapped blkaddr\t%d (byte %d in the flat device)", b.MappedBlkAddr, uint64(b.MappedBlkAddr)*uint64(sb.BlockSize))
		}
		p("  blocks\t%d", b.Blocks)
		if b.CICompressedSize > 0 || b.CIUncompressedSize > 0 {
			p("  chunk info\toffset %d, %d → %d bytes, %s", b.CIOffset, b.CICompressedSize, b.CIUncompressedSize, b.CICompressor)
		}
		if b.TOCSize > 0 {
			p("  toc\t%d bytes, sha256 %s", b.TOCSize, b.TOCDigest)
		}
	}
	c := &r.Counts
	p("Tree")
	p("  paths\t%d", c.Paths)
	p("  inodes\t%d", c.Inodes)
	p("  directories\t%d", c.Directories)
	p("  regular files\t%d, holding %s", c.RegularFiles, humanBytes(c.FileBytes))
	p("  symlinks\t%d", c.Symlinks)
	if n := c.CharDevices + c.BlockDevices + c.Fifos + c.Sockets; n > 0 {
		p("  special files\t%d char, %d block, %d fifo, %d socket", c.CharDevices, c.BlockDevices, c.Fifos, c.Sockets)
	}
	p("  hard links\t%d", c.HardLinks)
	p("  file chunks\t%d (%d holes)", c.Chunks, c.HoleChunks)
	p("  xattrs\t%d", c.Xattrs)
	if err := w.Flush(); err != nil {
		return err
	}
	if len(r.Tree) == 0 {
		return nil
	}
	fmt.Fprintln(out)
	tw := tabwriter.NewWriter(out, 0, 0, 1, ' ', tabwriter.AlignRight)
	for _, t := range r.Tree {
		link := ""
		if t.Target != "" {
			link = " -> " + t.Target
		}
		size := fmt.Sprint(t.Size)
		if t.Rdev != "" {
			size = t.Rdev
		}
		fmt.Fprintf(tw, "%s\t %d:%d\t %s\t %s\t %s%s\n", t.Mode, t.UID, t.GID, size, t.modTime.Format("2006-01-02 15:04:05.000000000"), t.Path, link)
	}
	return tw.Flush()
}
