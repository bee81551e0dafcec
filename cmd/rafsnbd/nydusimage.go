package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/urfave/cli/v3"

	"github.com/rafsnbd/rafsnbd/nydusimage"
	"github.com/rafsnbd/rafsnbd/verity"
)

// nydusImageName is the name under which the binary behaves as
// nydus-image ('make install' creates the symlink).
const nydusImageName = "nydus-image"

// nydusImageArgs turns a command line run as nydus-image (argv[0]'s base
// name) into the equivalent 'rafsnbd nydus-image ...' one.
func nydusImageArgs(args []string) []string {
	if len(args) == 0 || filepath.Base(args[0]) != nydusImageName {
		return args
	}
	return append([]string{args[0], nydusImageName}, args[1:]...)
}

// nydusVerityCompatEnv selects the tree export --verity writes: the
// snapshotter passes no flag for it, only its environment.
const nydusVerityCompatEnv = "RAFSNBD_VERITY_COMPAT"

const nydusImageUsage = `nydus-image (rafsnbd) implements the nydus-image calls of nydus-snapshotter's
tarfs mode:

  nydus-image create --type tar-tarfs --bootstrap FILE --blob-id ID --blob-dir DIR TAR
  nydus-image inspect -R blobs FILE
  nydus-image merge --bootstrap OUT LOWER.boot ... UPPER.boot
  nydus-image export --block --localfs-dir DIR --bootstrap FILE --output DISK [--verity]

create reads TAR (a file, a FIFO still being written, or - for stdin) as a
stream, to its end, and writes only the bootstrap: the blob is the tar itself,
which the caller keeps as DIR/ID. export --verity prints the dm-verity options
line first on stdout. Its tree is the one 'veritysetup format' writes (what
'veritysetup verify' accepts); ` + nydusVerityCompatEnv + `=nydus in the environment
writes nydus-image's bytes and root hash instead (the kernel accepts both).
Anything else nydus-image does is refused with exit status 2.

Run it through a symlink named nydus-image ('make install' makes one; point
nydus-snapshotter's [daemon] nydusimage_path at it), or as:

  rafsnbd nydus-image inspect -R blobs image.boot`

func init() {
	register(func() *cli.Command {
		return &cli.Command{
			Name:            nydusImageName,
			Usage:           "act as nydus-image for nydus-snapshotter's tarfs mode (also: run as a 'nydus-image' symlink)",
			ArgsUsage:       "create|inspect|merge|export ...",
			Description:     nydusImageUsage,
			SkipFlagParsing: true, // nydus-image's grammar, parsed by package nydusimage
			Action:          runNydusImage,
		}
	})
}

func runNydusImage(ctx context.Context, c *cli.Command) error {
	args := c.Args().Slice()
	if len(args) == 0 {
		return nydusUsage("no subcommand: give create, inspect, merge or export")
	}
	var err error
	switch sub, rest := args[0], args[1:]; sub {
	case "create":
		err = nydusCreate(ctx, rest)
	case "inspect":
		err = nydusInspect(rest, c.Root().Writer)
	case "merge":
		err = nydusMerge(ctx, rest)
	case "export":
		err = nydusExport(ctx, rest, c.Root().Writer)
	case "help", "--help", "-h":
		_, err = fmt.Fprintln(c.Root().Writer, nydusImageUsage)
	case "--version", "-V":
		_, err = fmt.Fprintf(c.Root().Writer, "nydus-image (rafsnbd %s)\n", version())
	default:
		return nydusUsage("%v", nydusimage.Unsupported("subcommand "+sub, "only create, inspect, merge and export"))
	}
	var ue *nydusimage.UnsupportedError
	if errors.As(err, &ue) {
		return nydusUsage("%s: %v", args[0], err)
	}
	return err
}

// nydusUsage is a command line nydus-image cannot run here: one line and
// exit status 2 (nydus-image --help lists what it can).
func nydusUsage(format string, args ...any) error {
	return &usageError{cmd: nydusImageName, err: fmt.Errorf(format, args...)}
}

// nydusParse parses a subcommand's flags; a flag outside spec or a
// malformed command line is a usage error.
func nydusParse(sub string, args []string, spec nydusimage.Spec) (*nydusimage.Args, error) {
	a, err := nydusimage.Parse(args, spec)
	var ue *nydusimage.UnsupportedError
	if err != nil && !errors.As(err, &ue) { // runNydusImage reports those
		err = nydusUsage("%s: %v", sub, err)
	}
	if err != nil {
		return nil, err
	}
	return a, nil
}

// nydusRequire checks that the flags the calls need are there.
func nydusRequire(sub string, a *nydusimage.Args, names ...string) error {
	for _, n := range names {
		if a.Values[n] == "" {
			return nydusUsage("%s: --%s is required", sub, n)
		}
	}
	return nil
}

func nydusCreate(ctx context.Context, args []string) error {
	a, err := nydusParse("create", args, nydusimage.Spec{
		Values: []string{"type", "bootstrap", "blob-id", "blob-dir"},
		Short:  map[string]string{"t": "type", "B": "bootstrap", "D": "blob-dir"},
	})
	if err != nil {
		return err
	}
	if t := a.Values["type"]; t != "tar-tarfs" {
		if t == "" {
			t = "directory (the default)"
		}
		return nydusimage.Unsupported("--type "+t, "only tar-tarfs")
	}
	if err := nydusRequire("create", a, "bootstrap", "blob-id", "blob-dir"); err != nil {
		return err
	}
	if len(a.Positional) != 1 {
		return nydusUsage("create: give exactly one TAR (a file, a FIFO, or - for stdin); got %d arguments", len(a.Positional))
	}
	src := a.Positional[0]
	var r io.Reader = os.Stdin
	if src != "-" {
		// A FIFO opens once its writer has opened it too, and is read as
		// a stream, never seeked.
		f, err := os.Open(src)
		if err != nil {
			return err
		}
		defer f.Close()
		r = f
	} else {
		src = "stdin"
	}
	res, err := nydusimage.CreateTarfs(ctx, r, a.Values["bootstrap"], a.Values["blob-id"])
	if err != nil {
		return fmt.Errorf("%s: %w", src, err)
	}
	logger(ctx).Debug().Str("bootstrap", a.Values["bootstrap"]).Str("blob_id", res.Blobs[0].ID).
		Int64("tar_bytes", res.Blobs[0].Size).Msg("tarfs bootstrap written")
	return nil
}

func nydusInspect(args []string, stdout io.Writer) error {
	a, err := nydusParse("inspect", args, nydusimage.Spec{
		Values: []string{"request", "bootstrap"},
		Short:  map[string]string{"R": "request", "B": "bootstrap"},
	})
	if err != nil {
		return err
	}
	boot := a.Values["bootstrap"]
	if boot == "" && len(a.Positional) == 1 {
		boot = a.Positional[0]
	} else if len(a.Positional) != 0 || boot == "" {
		return nydusUsage("inspect: give exactly one bootstrap FILE")
	}
	req, ok := a.Values["request"]
	if !ok {
		return nydusimage.Unsupported("the interactive inspector", "only -R blobs")
	}
	if req = strings.TrimSpace(req); req != "blobs" {
		return nydusimage.Unsupported("-R "+req, "only -R blobs")
	}
	out, err := nydusimage.InspectBlobs(boot)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(stdout, "%s\n", out)
	return err
}

func nydusMerge(ctx context.Context, args []string) error {
	a, err := nydusParse("merge", args, nydusimage.Spec{
		Values: []string{"bootstrap"},
		Short:  map[string]string{"B": "bootstrap"},
	})
	if err != nil {
		return err
	}
	if err := nydusRequire("merge", a, "bootstrap"); err != nil {
		return err
	}
	if len(a.Positional) == 0 {
		return nydusUsage("merge: give the layer bootstraps, lowest layer first")
	}
	_, err = nydusimage.Merge(ctx, a.Values["bootstrap"], a.Positional)
	return err
}

func nydusExport(ctx context.Context, args []string, stdout io.Writer) error {
	a, err := nydusParse("export", args, nydusimage.Spec{
		Values: []string{"localfs-dir", "bootstrap", "output"},
		Bools:  []string{"block", "verity"},
		Short:  map[string]string{"D": "localfs-dir", "B": "bootstrap", "O": "output"},
	})
	if err != nil {
		return err
	}
	if !a.Bools["block"] {
		return nydusimage.Unsupported("export without --block", "only block disks")
	}
	if err := nydusRequire("export", a, "localfs-dir", "bootstrap", "output"); err != nil {
		return err
	}
	if len(a.Positional) != 0 {
		return nydusUsage("export: unexpected argument %q", a.Positional[0])
	}
	opts := nydusimage.ExportOptions{Verity: a.Bools["verity"]}
	if env := os.Getenv(nydusVerityCompatEnv); env != "" {
		if opts.Compat, err = verity.ParseCompat(env); err != nil {
			return nydusUsage("export: %s=%s: %v", nydusVerityCompatEnv, env, err)
		}
	}
	res, err := nydusimage.ExportBlock(ctx, a.Values["bootstrap"], a.Values["localfs-dir"], a.Values["output"], opts)
	if err != nil {
		return err
	}
	if res.Tree != nil {
		// nydus-snapshotter scans the whole of stdout with this line's
		// pattern: it must come first.
		_, err = fmt.Fprintln(stdout, res.Tree.Options())
	}
	return err
}
