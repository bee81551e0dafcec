package main

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strings"
	"syscall"

	"github.com/urfave/cli/v3"

	"github.com/rafsnbd/rafsnbd/internal/atomicfile"
	"github.com/rafsnbd/rafsnbd/verity"
)

func init() {
	register(func() *cli.Command {
		return &cli.Command{
			Name:  "verity",
			Usage: "build or check a dm-verity hash tree for a disk file (veritysetup format 1, no superblock)",
			Description: `Computes the same hash trees as 'veritysetup format --no-superblock --format=1',
on all cores and reading the data once; or nydus' variant of them (--compat nydus).

The tree goes after the data in DATA itself, at the next hash-block boundary
(the gap, if any, reads as zeros), or into HASHFILE when one is given. The
root hash and the options line nydus prints are written to stdout:

  rafsnbd verity format image.disk
  rafsnbd verity verify --data-blocks 521 image.disk 0e577911...3da5

  rafsnbd verity format --data-block-size 512 layer.tar layer.hash
  veritysetup verify --no-superblock --format=1 --data-block-size=512 --salt=- layer.tar layer.hash <root>

The kernel accepts both fillings of unused digest slots; 'veritysetup verify'
only accepts the standard one (zeros).`,
			Commands: []*cli.Command{
				{
					Name:      "format",
					Usage:     "compute the tree of DATA and write it after the data or to HASHFILE",
					ArgsUsage: "DATA [HASHFILE]",
					Description: `DATA is a file or block device; all of it is covered unless --data-blocks
says otherwise, so its size must be a multiple of --data-block-size. Do not
run this twice on a DATA that already holds an appended tree without
--data-blocks: the old tree would count as data.

The tree is written at --hash-offset (default 0 in HASHFILE, the end of the
data in DATA). A missing HASHFILE is created and appears only when complete;
an existing regular file or block device gets the tree written in, the rest
of it kept; anything else (a symbolic link, a character device, a
directory) is refused. The tree is built aside and written into DATA or
HASHFILE only when complete, so an interrupted format leaves them as they
were.`,
					Flags:  verityFlags(),
					Action: runVerityFormat,
				},
				{
					Name:      "verify",
					Usage:     "check DATA and its tree (after the data, or in HASHFILE) against ROOT",
					ArgsUsage: "DATA [HASHFILE] ROOT",
					Description: `Exits non-zero and names the first bad block (as veritysetup verify does:
data blocks first, then each level of the tree, then the root) when the
data or the tree do not match ROOT.

With the tree appended to DATA, --data-blocks is required: the file's size
alone does not say where the data ends. The other options must be those
given to format.`,
					Flags:  verityFlags(),
					Action: runVerityVerify,
				},
			},
		}
	})
}

func verityFlags() []cli.Flag {
	return []cli.Flag{
		sizeFlag("data-block-size", 4096, "data block `SIZE`: a power of two, 512 (tarfs images) to 64K"),
		sizeFlag("hash-block-size", 4096, "hash block `SIZE`: a power of two, 512 to 64K"),
		&cli.Uint64Flag{Name: "data-blocks", Usage: "number of data blocks `N` to cover", DefaultText: "all of DATA"},
		hashOffsetFlag(),
		// veritysetup's spelling of what the tree is, so that the line export
		// and convert print ("--no-superblock --format=1 -s \"\" ...") can be
		// pasted as it is.
		&cli.BoolFlag{Name: "no-superblock", Value: true, Usage: "no verity superblock (the only layout rafsnbd writes; accepted for veritysetup's command line)"},
		jsonFlag(),
		&cli.IntFlag{Name: "format", Value: 1, Usage: "hash `FORMAT`: 1, the only one (accepted for veritysetup's command line)"},
		&cli.StringFlag{Name: "salt", Aliases: []string{"s"}, Value: "-", Usage: "salt as `HEX`, or - for none (veritysetup's default is a random salt; pass it here)"},
		&cli.StringFlag{Name: "hash", Value: "sha256", Usage: "hash `ALGORITHM`: sha256, sha1 or sha512"},
		&cli.StringFlag{Name: "compat", Value: "standard", Usage: "`MODE` for unused digest slots: standard (zeros, like veritysetup) or nydus (sha256 of a zero page, like nydus-image export --verity; sha256 only, no salt)"},
	}
}

func hashOffsetFlag() cli.Flag {
	f := sizeFlag("hash-offset", 0, "byte `OFFSET` of the tree in the hash file, a multiple of the hash block size")
	f.DefaultText = "0 in HASHFILE; in DATA, the data size rounded up to a hash block"
	return f
}

// verityParams builds the tree parameters from the flags for data of
// dataBytes bytes, with the tree appended to the data or in its own file.
func verityParams(c *cli.Command, dataBytes int64, appended bool) (verity.Params, error) {
	p := verity.Params{
		Algorithm:     c.String("hash"),
		DataBlockSize: int(flagSize(c, "data-block-size")),
		HashBlockSize: int(flagSize(c, "hash-block-size")),
	}
	if f := c.Int("format"); f != 1 {
		return p, usagef(c, "--format=%d: only format 1 (no superblock) is supported", f)
	}
	if !c.Bool("no-superblock") {
		return p, usagef(c, "--no-superblock=false: trees with a verity superblock are not supported")
	}
	var err error
	if p.Compat, err = verity.ParseCompat(c.String("compat")); err != nil {
		return p, err
	}
	if s := c.String("salt"); s != "-" && s != "" {
		if p.Salt, err = hex.DecodeString(s); err != nil {
			return p, fmt.Errorf("--salt %q: not hex: %w", s, err)
		}
	}
	if p.DataBlockSize <= 0 {
		return p, fmt.Errorf("--data-block-size %d: must be positive", p.DataBlockSize)
	}
	if c.IsSet("data-blocks") {
		p.DataBlocks = c.Uint64("data-blocks")
		if p.DataSize() > uint64(dataBytes) || p.DataBlocks > uint64(dataBytes) {
			return p, fmt.Errorf("--data-blocks %d: %d-byte blocks need %d bytes, the data has %d", p.DataBlocks, p.DataBlockSize, p.DataSize(), dataBytes)
		}
	} else {
		if dataBytes%int64(p.DataBlockSize) != 0 {
			return p, fmt.Errorf("the data is %d bytes, not a whole number of %d-byte blocks: pad it or pass --data-blocks", dataBytes, p.DataBlockSize)
		}
		p.DataBlocks = uint64(dataBytes) / uint64(p.DataBlockSize)
	}
	switch {
	case c.IsSet("hash-offset"):
		p.HashOffset = uint64(flagSize(c, "hash-offset"))
		if appended && p.HashOffset < p.DataSize() {
			return p, fmt.Errorf("--hash-offset %d would put the tree inside the %d bytes of data", p.HashOffset, p.DataSize())
		}
	case appended:
		p.HashOffset = verity.AppendedHashOffset(p.DataSize(), p.HashBlockSize)
	}
	return p, p.Validate()
}

// deviceSize works for block devices too, whose Stat size is 0.
func deviceSize(f *os.File) (int64, error) {
	n, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return 0, fmt.Errorf("%s: size: %w", f.Name(), err)
	}
	return n, nil
}

// openVerityFiles opens the data and the hash file (the same file when the
// tree is appended; the hash file is created when writing) and works out
// the tree's parameters from the flags and the data size.
func openVerityFiles(c *cli.Command, dataPath, hashPath string, appended, write bool) (data, hash *os.File, p verity.Params, closeFiles func(), err error) {
	dataFlag := os.O_RDONLY
	if appended && write {
		dataFlag = os.O_RDWR
	}
	if data, err = os.OpenFile(dataPath, dataFlag, 0); err != nil {
		return nil, nil, p, nil, err
	}
	hash = data
	closeFiles = func() {
		if hash != data {
			hash.Close()
		}
		data.Close()
	}
	size, err := deviceSize(data)
	if err == nil {
		p, err = verityParams(c, size, appended)
	}
	if err == nil && !appended && write {
		// nil for a missing HASHFILE: formatInto creates it whole.
		hash, err = openHashFile(hashPath)
		if err != nil || hash == nil {
			hash = data
		}
	} else if err == nil && !appended {
		hash, err = os.Open(hashPath)
		if err != nil {
			hash = data
		}
	}
	if err != nil {
		closeFiles()
		return nil, nil, p, nil, err
	}
	return data, hash, p, closeFiles, nil
}

// openHashFile opens an existing HASHFILE to write a tree into: a regular
// file or a block device. It returns nil for a missing one, which is then
// created whole (atomicfile), and refuses anything else: writing through a
// symbolic link or into a character device is never what was meant.
func openHashFile(path string) (*os.File, error) {
	st, err := os.Lstat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil, nil
	case err != nil:
		return nil, err
	case st.Mode().IsRegular(), st.Mode()&fs.ModeType == fs.ModeDevice: // a block device
		// O_NOFOLLOW: not through a symbolic link swapped in since.
		return os.OpenFile(path, os.O_RDWR|syscall.O_NOFOLLOW, 0)
	}
	return nil, atomicfile.CheckTarget(path)
}

// formatInto builds the tree and writes it into out (DATA or an existing
// HASHFILE), or into a new hashPath when out is data and the tree is not
// appended.
func formatInto(ctx context.Context, data, out *os.File, hashPath string, appended bool, p verity.Params, progress func(int64)) (*verity.Tree, error) {
	if appended || out != data {
		tree, err := verity.BuildInto(ctx, data, p, out, verity.WithProgress(progress))
		if err == nil {
			err = out.Sync()
		}
		return tree, err
	}
	tmp, err := atomicfile.Create(hashPath)
	if err != nil {
		return nil, err
	}
	defer tmp.Abort()
	tree, err := verity.Build(ctx, data, p, tmp, verity.WithProgress(progress))
	if err == nil {
		err = tmp.Truncate(int64(p.HashOffset + p.TreeSize()))
	}
	if err == nil {
		err = tmp.Chmod(0o644)
	}
	if err == nil {
		err = tmp.Commit()
	}
	return tree, err
}

func runVerityFormat(ctx context.Context, c *cli.Command) error {
	args := c.Args().Slice()
	if len(args) < 1 || len(args) > 2 {
		return usagef(c, "want DATA [HASHFILE], got %d arguments", len(args))
	}
	appended := len(args) == 1
	data, out, p, closeFiles, err := openVerityFiles(c, args[0], args[len(args)-1], appended, true)
	if err != nil {
		return err
	}
	defer closeFiles()
	log := logger(ctx)
	log.Debug().Str("data", args[0]).Uint64("blocks", p.DataBlocks).Int("block_size", p.DataBlockSize).
		Uint64("hash_offset", p.HashOffset).Uint64("tree_bytes", p.TreeSize()).Msg("building dm-verity tree")

	update, finish := newProgress(int64(p.DataSize()), "hashing")
	tree, err := formatInto(ctx, data, out, args[len(args)-1], appended, p, update)
	finish()
	if err != nil {
		return fmt.Errorf("verity format %s: %w", args[0], err)
	}
	if c.Bool("json") {
		return printJSON(c.Root().Writer, verityReport(tree))
	}
	printTree(c.Root().Writer, tree)
	log.Info().Msgf("check with: rafsnbd verity verify %s %s %s", verityFlagArgs(p, appended), strings.Join(args, " "), tree.RootHex())
	if p.Compat == verity.Standard {
		log.Info().Msgf("or: veritysetup verify %s %s %s %s", strings.Join(p.VeritysetupArgs(), " "), args[0], args[len(args)-1], tree.RootHex())
	}
	return nil
}

// verityFlagArgs renders the flags that give p again, for a hint.
func verityFlagArgs(p verity.Params, appended bool) string {
	salt := "-"
	if len(p.Salt) > 0 {
		salt = hex.EncodeToString(p.Salt)
	}
	args := fmt.Sprintf("--hash %s --salt %s --data-block-size %d --hash-block-size %d --data-blocks %d",
		p.Algorithm, salt, p.DataBlockSize, p.HashBlockSize, p.DataBlocks)
	if appended || p.HashOffset != 0 {
		args += fmt.Sprintf(" --hash-offset %d", p.HashOffset)
	}
	if p.Compat != verity.Standard {
		args += " --compat " + p.Compat.String()
	}
	return args
}

func printTree(w io.Writer, t *verity.Tree) {
	p := t.Params
	salt := "-"
	if len(p.Salt) > 0 {
		salt = hex.EncodeToString(p.Salt)
	}
	fmt.Fprintf(w, "Root hash:       %s\n", t.RootHex())
	fmt.Fprintf(w, "Hash algorithm:  %s\n", p.Algorithm)
	fmt.Fprintf(w, "Salt:            %s\n", salt)
	fmt.Fprintf(w, "Data blocks:     %d\n", p.DataBlocks)
	fmt.Fprintf(w, "Data block size: %d\n", p.DataBlockSize)
	fmt.Fprintf(w, "Hash blocks:     %d\n", p.HashBlocks())
	fmt.Fprintf(w, "Hash block size: %d\n", p.HashBlockSize)
	fmt.Fprintf(w, "Hash offset:     %d\n", p.HashOffset)
	fmt.Fprintf(w, "Spare slots:     %s\n", p.Compat)
	fmt.Fprintln(w, t.Options())
}

func runVerityVerify(ctx context.Context, c *cli.Command) error {
	args := c.Args().Slice()
	if len(args) < 2 || len(args) > 3 {
		return usagef(c, "want DATA [HASHFILE] ROOT, got %d arguments", len(args))
	}
	appended := len(args) == 2
	root, err := hex.DecodeString(args[len(args)-1])
	if err != nil {
		return fmt.Errorf("verity verify: root hash %q is not hex", args[len(args)-1])
	}
	if appended && !c.IsSet("data-blocks") {
		return usagef(c, "with the tree appended to DATA, pass --data-blocks (format printed it)")
	}
	data, hashFile, p, closeFiles, err := openVerityFiles(c, args[0], args[1], appended, false)
	if err != nil {
		return err
	}
	defer closeFiles()
	update, finish := newProgress(int64(p.DataSize()), "verifying")
	err = verity.Verify(ctx, data, hashFile, p, root, verity.WithProgress(update))
	finish()
	if err != nil {
		return fmt.Errorf("verity verify %s: %w", args[0], err)
	}
	if c.Bool("json") {
		return printJSON(c.Root().Writer, verityReport(&verity.Tree{Params: p, Root: root}))
	}
	fmt.Fprintf(c.Root().Writer, "Verified %d data blocks and %d hash blocks against root hash %x.\n", p.DataBlocks, p.HashBlocks(), root)
	return nil
}
