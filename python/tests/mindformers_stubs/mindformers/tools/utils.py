"""Stand-in of the mindformers.tools.utils functions TransformCkpt imports,
with their behaviour for one process on one node outside ModelArts (the
environment variables mindformers reads: RANK_ID, RANK_SIZE)."""
import os
import shutil


def get_real_rank():
    return int(os.getenv("RANK_ID", "0"))


def get_real_group_size():
    return int(os.getenv("RANK_SIZE", "1"))


def check_in_modelarts():
    return False


def get_output_root_path():
    return os.path.realpath(os.getenv("MF_OUTPUT_DIR", "./output"))


def get_remote_save_url():
    return None


def get_device_num_per_node():
    return 8


def create_file(file_path, info=None):
    with open(file_path, "w") as f:
        if info:
            f.write("\n".join(map(str, info)) if isinstance(info, list) else info)


def delete_file(file_path):
    if os.path.exists(file_path):
        os.remove(file_path)


def is_main_rank():
    return get_real_rank() == 0


def remake_folder(folder_path, permissions=None):
    if is_main_rank():
        if os.path.exists(folder_path):
            shutil.rmtree(folder_path)
        os.makedirs(folder_path, exist_ok=True)
        if permissions is not None:
            os.chmod(folder_path, permissions)


def format_path(path):
    return os.path.realpath(path) if path else path


def barrier_world(action=None):
    return None
