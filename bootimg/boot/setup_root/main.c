/* bootimg-setup-root: the boot path of a bootimg release in one small program (no shell, no
 * per-file or per-step processes). Subcommands:
 *
 *   bootimg-setup-root                    set up the verified root (bootimg-root.service, initrd)
 *   bootimg-setup-root provision RELEASE_DIR [OBJECTS_DIR]
 *   bootimg-setup-root mount-image [--fsverity=...] [--bind=SRC:TARGET]... NAME DIGEST
 *   bootimg-setup-root mount-image --umount NAME  |  umount-image NAME
 *   bootimg-setup-root bless              raise the rollback minimum to the booted release's
 *                                         security_version (bootimg-bless.service, after a good boot)
 *
 * Called as bootimg-mount-image it is mount-image; as bootimg-provision, provision. */
#include <stdio.h>
#include <string.h>

#include "bsr.h"

int main(int argc, char **argv)
{
    const char *base = argc > 0 ? strrchr(argv[0], '/') : NULL;
    base = base ? base + 1 : argc > 0 ? argv[0] : "";
#ifdef BOOTIMG_TEST_HOOKS
    verity_test_setup();
#endif
    if (strcmp(base, "bootimg-mount-image") == 0)
        return mount_image_main(argc, argv);
    if (strcmp(base, "bootimg-provision") == 0)
        return provision_main(argc, argv);
    if (argc <= 1 || strcmp(argv[1], "setup-root") == 0)
        return setup_root_main();
    if (strcmp(argv[1], "provision") == 0)
        return provision_main(argc - 1, argv + 1);
    if (strcmp(argv[1], "mount-image") == 0)
        return mount_image_main(argc - 1, argv + 1);
    if (strcmp(argv[1], "bless") == 0)
        return bless_main(argc - 1, argv + 1);
    if (strcmp(argv[1], "umount-image") == 0) {
        char *args[] = {argv[1], "--umount", argc > 2 ? argv[2] : "", NULL};
        return mount_image_main(argc == 3 ? 3 : 4, args);
    }
    dprintf(2, "usage: bootimg-setup-root [setup-root | provision RELEASE_DIR [OBJECTS_DIR] | "
               "mount-image [--fsverity=required|optional] [--bind=SRC:TARGET]... NAME DIGEST | umount-image NAME | bless]\n");
    return 2;
}
