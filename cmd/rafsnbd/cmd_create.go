package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/urfave/cli/v3"

	"github.com/rafsnbd/rafsnbd/internal/atomicfile"
	"github.com/rafsnbd/rafsnbd/internal/ctxio"
	"github.com/rafsnbd/rafsnbd/rafs"
	"github.com/rafsnbd/rafsnbd/rafs/build"
)

func init() {
	register(func() *cli.Command {
		return &cli.Command{
			Name:      "create",
			Usage:     "build a RAFS v6 image (bootstrap + blobs) from a directory or a tar",
			ArgsUsage: "SOURCE",
			Description: `Builds a RAFS v6 image from SOURCE: a directory, a tar file, or - (a tar on
standard input).

  rafsnbd create -B image.boot -D blobs/ rootfs/
  rafsnbd create -B layer.boot -D blobs/ layer.tar        (tarfs)
  docker export c | rafsnbd create -B layer.boot -D blobs/ -

Directory mode (--type dir) cuts every file into chunks, compresses each chunk
(--compressor; a chunk that does not shrink is stored raw), stores identical
chunks once, and writes one blob to BLOBDIR named by the sha256 of its bytes.

Tarfs mode (--type tarfs, the default for a tar) reads only the tar's headers:
the tar itself becomes the blob (reflinked, hard-linked or copied into BLOBDIR
as <sha256 of the tar>, or as --blob-id), and the bootstrap points at file
data inside it with 512-byte blocks. Entries apply as OCI layer extraction
does: names are cleaned, names escaping the root are an error, later entries
replace earlier ones, missing parents appear as 0755 directories. A tar on
standard input is spooled into BLOBDIR first. A gzip or zstd tar (told by its
first bytes) is decompressed into BLOBDIR: the blob is the tar inside.

The outputs may lie inside a source directory (create -B DIR/image.boot
-D DIR/blobs DIR): they are left out of the image. A create that fails
removes the blob directory if it made it.

Builds are reproducible: the same SOURCE gives the same bytes. Prints the
bootstrap and every blob with its size. Then, for example:

  rafsnbd export -B image.boot -D blobs/ -o image.disk
  mount -t erofs -o loop,ro image.disk /mnt`,
			Flags: []cli.Flag{
				jsonFlag(),
				&cli.StringFlag{Name: "bootstrap", Aliases: []string{"B"}, Required: true, Usage: "bootstrap `FILE` to write"},
				&cli.StringFlag{Name: "blob-dir", Aliases: []string{"D"}, Required: true, Usage: "`DIR` to write blobs into (created if missing)"},
				&cli.StringFlag{Name: "type", Usage: "`TYPE` of image: dir or tarfs (default: dir for a directory, tarfs for a tar)"},
				&cli.StringFlag{Name: "compressor", Value: "zstd", Usage: "chunk `ALGORITHM` in dir mode: zstd, lz4_block, gzip or none"},
				&cli.StringFlag{Name: "digester", Value: "blake3", Usage: "chunk digest `ALGORITHM` in dir mode: blake3 or sha256"},
				sizeFlag("chunk-size", 1<<20, "chunk `SIZE`: a power of two from 4K to 16M"),
				&cli.StringFlag{Name: "blob-id", Usage: "tarfs: name the tar blob `ID` (e.g. its layer digest, sha256:...) instead of hashing it"},
				&cli.IntFlag{Name: "workers", Usage: "`N` goroutines compressing chunks (default: number of CPUs)"},
			},
			Action: runCreate,
		}
	})
}

func runCreate(ctx context.Context, c *cli.Command) (err error) {
	log := logger(ctx)
	if c.NArg() != 1 {
		return errors.New("give exactly one SOURCE: a directory, a tar file, or - for a tar on stdin")
	}
	src := c.Args().First()
	opts := build.DefaultOptions(c.String("blob-dir"))
	if opts.Compressor, err = rafs.ParseCompressor(c.String("compressor")); err != nil {
		return err
	}
	if opts.Digester, err = rafs.ParseDigester(c.String("digester")); err != nil {
		return err
	}
	if opts.ChunkSize, err = checkChunkSize(flagSize(c, "chunk-size")); err != nil {
		return err
	}
	opts.BlobID = c.String("blob-id")
	opts.Workers = c.Int("workers")

	isDir := false
	if src != "-" {
		st, err := os.Stat(src)
		if err != nil {
			return err
		}
		isDir = st.IsDir()
	}
	typ := build.TypeTarfs
	if isDir {
		typ = build.TypeDir
	}
	if c.IsSet("type") {
		if typ, err = build.ParseType(c.String("type")); err != nil {
			return err
		}
	}
	switch {
	case typ == build.TypeDir && !isDir:
		return fmt.Errorf("--type dir needs a directory; %s is not one", src)
	case typ == build.TypeTarfs && isDir:
		return fmt.Errorf("--type tarfs needs a tar file or -; %s is a directory", src)
	case typ == build.TypeTarfs && (c.IsSet("compressor") || c.IsSet("digester")):
		return errors.New("tarfs blobs are raw tars: --compressor and --digester apply to dir mode only")
	case typ == build.TypeDir && c.IsSet("blob-id"):
		return errors.New("--blob-id applies to tarfs only: dir-mode blobs are named by their sha256")
	}

	undoBlobDir, err := makeBlobDir(opts.BlobDir)
	if err != nil {
		return err
	}
	var res *build.Result
	defer func() {
		if err != nil {
			undoBlobDir(res)
		}
	}()

	bootPath := c.String("bootstrap")
	// Refused before the build if it is a directory, a device or a
	// symbolic link; appears only whole and synced.
	boot, err := atomicfile.Create(bootPath)
	if err != nil {
		return err
	}
	defer boot.Abort()
	bw := bufio.NewWriterSize(boot, 1<<20)

	log.Debug().Str("source", src).Stringer("type", typ).Msg("building")
	// The outputs may lie inside a source directory: they are not part of
	// the image (the blob dir is left out by the build itself).
	opts.Exclude = []string{bootPath, boot.Name()}
	if typ == build.TypeDir {
		res, err = build.FromDir(ctx, src, bw, opts)
	} else {
		res, err = createFromTar(ctx, src, bw, opts)
	}
	if err == nil {
		err = bw.Flush()
	}
	if err == nil {
		err = boot.Chmod(0o644)
	}
	if err == nil {
		err = boot.Commit()
	}
	if err != nil {
		return err
	}

	if c.Bool("json") {
		type blobJSON struct {
			ID               string `json:"id"`
			Path             string `json:"path"`
			Bytes            int64  `json:"bytes"`
			UncompressedSize uint64 `json:"uncompressed_bytes"`
			Chunks           uint32 `json:"chunks"`
			Placed           string `json:"placed,omitempty"`
		}
		r := struct {
			Bootstrap string     `json:"bootstrap"`
			Bytes     int64      `json:"bytes"`
			Inodes    uint64     `json:"inodes"`
			Blobs     []blobJSON `json:"blobs"`
		}{Bootstrap: bootPath, Bytes: int64(res.Bootstrap.Size), Inodes: uint64(res.Bootstrap.Inodes), Blobs: []blobJSON{}}
		for _, b := range res.Blobs {
			r.Blobs = append(r.Blobs, blobJSON{b.ID, b.Path, b.Size, b.UncompressedSize, b.Chunks, b.Placed})
		}
		return printJSON(c.Root().Writer, r)
	}
	fmt.Fprintf(c.Root().Writer, "bootstrap %s: %d bytes, %d inodes\n", bootPath, res.Bootstrap.Size, res.Bootstrap.Inodes)
	for _, b := range res.Blobs {
		how := ""
		if b.Placed != "" {
			how = ", " + b.Placed
		}
		fmt.Fprintf(c.Root().Writer, "blob %s: %d bytes, %d uncompressed, %d chunks%s\n", b.ID, b.Size, b.UncompressedSize, b.Chunks, how)
	}
	return nil
}

// createFromTar builds from a tar file, or from stdin spooled into the
// blob directory (where the build then hard-links it to its final name).
func createFromTar(ctx context.Context, src string, boot io.Writer, opts build.Options) (*build.Result, error) {
	var f *os.File
	if src == "-" {
		if err := os.MkdirAll(opts.BlobDir, 0o755); err != nil {
			return nil, err
		}
		spool, err := atomicfile.CreateIn(opts.BlobDir, "stdin")
		if err != nil {
			return nil, err
		}
		defer spool.Abort() // never committed: the build links it to its blob name
		if _, err := io.CopyBuffer(spool, ctxio.NewReader(ctx, os.Stdin), make([]byte, 1<<20)); err != nil {
			return nil, fmt.Errorf("spooling stdin: %w", err)
		}
		// The spool becomes the blob by a hard link: make it readable
		// like any blob.
		if err := spool.Chmod(0o644); err != nil {
			return nil, err
		}
		f = spool.File
	} else {
		var err error
		if f, err = os.Open(src); err != nil {
			return nil, err
		}
		defer f.Close()
	}
	res, err := build.FromTar(ctx, f, boot, opts)
	if err != nil {
		if src == "-" {
			src = "stdin"
		}
		return nil, fmt.Errorf("%s: %w", src, err)
	}
	return res, nil
}

// checkChunkSize checks a --chunk-size: a power of two from 4K to 16M.
func checkChunkSize(n int64) (uint32, error) {
	if n < 4096 || n > 16<<20 || n&(n-1) != 0 {
		return 0, fmt.Errorf("--chunk-size %s: want a power of two from 4K to 16M", formatSize(n))
	}
	return uint32(n), nil
}
